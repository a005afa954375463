"""Test-only (tests/test_board_env.py): on PYTHONPATH of board-venv processes with FEDFINN_FAKE_ZYNQ
set. The moment a process imports pynq, the fake Zynq board (fake_zynq.py) becomes pynq's active
device, before anything can open an Overlay; processes that never import pynq are left alone.
FEDFINN_FAKE_ZYNQ = where the board's log goes at exit (<path>.json + <path>.npz), or "1" for none."""

import importlib.abc
import importlib.machinery
import os
import sys


class _AfterPynq(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "pynq":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import fake_zynq

            rec = os.environ["FEDFINN_FAKE_ZYNQ"]
            fake_zynq.install(None if rec == "1" else rec)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("FEDFINN_FAKE_ZYNQ"):
    sys.meta_path.insert(0, _AfterPynq())
