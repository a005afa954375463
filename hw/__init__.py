"""Hardware flow: FINN (finn-plus) builds of the deployable models for PYNQ boards.

See docs/hardware.md. Layer: imports ``export`` (finn_env: the FINN environment and
its no-Vivado work-around) and ``training.models``; never ``client_pynq``.
Modules: boards (parts and capacities), build (config + named steps), transforms,
estimate, report, datfiles (runtime-weight files and their layout), weights
(per-round runtime weights), packing, emulate (FINN's Python execution), bitstream.
The commands are ``fedfinn hw ...`` (fedfinn.hw_commands).
"""
