"""``make bitstream``: the steps that need Vivado + Vitis HLS (all finn-plus's own).

Runs :data:`hw.build.BITSTREAM_STEPS` on the folded model ``make hw`` left
(HLS IP generation and FIFO sizing, stitched IP, the Zynq block design,
synthesis, place & route and bitfile, PYNQ driver, deployment package).
Outputs: ``<build>/bitfile/finn-accel.{bit,hwh}``, ``<build>/driver``,
``<build>/deploy`` (copy to the board), ``<build>/report/post_synth_*``.

Callers check for Vivado first (``hw.cli.cmd_bitstream``); this module is
only imported when it is there.
"""

from __future__ import annotations

import time
from pathlib import Path

from qonnx.core.modelwrapper import ModelWrapper

from export.finn_env import vivado_info

from .build import BITSTREAM_STEPS, FINAL_STEP, HW_STEPS, find_intermediate, run_steps
from .weights import load_config


def run_bitstream(build_dir: str | Path) -> dict:
    info = vivado_info()
    if not info.present:
        raise RuntimeError("Vivado not found: " + "; ".join(info.missing))
    build_dir = Path(build_dir)
    cfg = load_config(build_dir)
    model = ModelWrapper(str(find_intermediate(build_dir, FINAL_STEP)))
    t0 = time.time()
    run_steps(cfg, steps=BITSTREAM_STEPS, model=model, first_index=len(HW_STEPS) + 1,
              record="bitstream_config.json")
    return {
        "build": str(build_dir),
        "bitfile": sorted(str(p) for p in (build_dir / "bitfile").glob("*")),
        "deploy": str(build_dir / "deploy"),
        "seconds": round(time.time() - t0, 1),
        "vivado": info.as_dict(),
    }
