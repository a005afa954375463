"""Hardware flow: FINN (finn-plus) builds of the deployable models for PYNQ boards.

See docs/hardware.md. Modules: finn_env (environment + no-Vivado work-around),
boards, build (config + named steps), transforms, weights (per-round runtime
weights), packing, emulate, report, bitstream, cli (``fedfinn hw ...``).
"""
