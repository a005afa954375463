"""The top layer: host-side wiring of a federated run and the ``fedfinn`` command.

Layers, in the order of a round: ``training`` (data, models, loop, codec, the
Flower apps and the server loop) <- ``export`` (QONNX, FINN-ONNX) <- ``hw``
(FINN builds, runtime weights) <- ``fedfinn`` (this package: the round
observers that export each round and measure it on boards, the host side of
the board protocol, the deployment's ServerApp and the CLI). ``client_pynq``
(what runs on a board) imports nothing of the project; this package talks to
it over its protocol.
"""
