"""Hardware flow: FINN (finn-plus) builds of the deployable models for PYNQ boards.

See docs/hardware.md. Layer: imports ``export`` (finn_env: the FINN environment and
its no-Vivado work-around) and ``training.models``; never ``client_pynq``.
Modules: boards (parts and capacities), config (the build configuration, step and
file names), build (fedfinn's steps on finn-plus's runner), folding (per-layer
folding at a cycle target), budget (everything the bitstream flow adds, counted,
with the sources of the stated figures), estimate, report, transforms, datfiles
(runtime-weight files and their layout), recipe (how the runtime-writable tensors
derive from the QONNX parameters), weights (per-round runtime weights), packing,
emulate (FINN's Python execution), bitstream.
The commands are ``fedfinn hw ...`` (fedfinn.hw_commands).
"""
