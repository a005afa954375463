"""Test-only (tests/test_board_env.py): runs at the start of every Python process of the board venv
that has this folder on PYTHONPATH and FEDFINN_FAKE_ZYNQ set, before anything imports pynq's
Overlay: the fake Zynq board (fake_zynq.py) becomes pynq's active device.
FEDFINN_FAKE_ZYNQ = where the board's log goes at exit (<path>.json + <path>.npz), or "1" for no log."""

import os

if os.environ.get("FEDFINN_FAKE_ZYNQ"):
    import fake_zynq

    _rec = os.environ["FEDFINN_FAKE_ZYNQ"]
    fake_zynq.install(None if _rec == "1" else _rec)
