"""fedfinn's board side: an agent on a PYNQ board (or an emulator on the host) that
takes each round's runtime weights, runs the test images through the FINN
accelerator and reports accuracy, images/s, latency and power.

* ``python -m client_pynq serve --deploy DIR --port P`` (on the board) or
  ``--emulate BUILD [--mode fast]`` (on the host): :mod:`client_pynq.agent`;
* the protocol (versioned, length-prefixed, JSON + raw bytes): :mod:`client_pynq.protocol`;
* what computes: :mod:`client_pynq.backends` (board / bit-exact emulator / fast emulator);
* the host side: :mod:`fedfinn.boards` (``BoardClient``, ``measure_round``), outside this package.

Importing this package, the protocol, the agent, the backends and the host
client needs only the standard library and numpy (>= 1.21, < 2 works): a PYNQ
image has no torch, finn or flwr. pynq and finn-plus-driver are imported by the
board backend only; the emulators import onnx/qonnx/onnxruntime/finn lazily.
See docs/board.md.
"""

__version__ = "2.0.0"
