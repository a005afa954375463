"""``make bitstream``: the steps that need Vivado + Vitis HLS (all finn-plus's own).

Runs :data:`hw.build.BITSTREAM_STEPS` with finn-plus's runner, starting after the
folded model ``make hw`` left (``start_step``: finn-plus loads
``intermediate_models/step_generate_estimate_reports.onnx``): HLS IP generation and
FIFO sizing, stitched IP, the Zynq block design, synthesis, place & route and
bitfile, PYNQ driver, deployment package. Outputs: ``<build>/bitfile/finn-accel.{bit,hwh}``,
``<build>/driver``, ``<build>/deploy`` (copy to the board), ``<build>/report/post_synth_*``.

The runtime-weight file names (``<partition>_<index>_<layer>.dat``) come from the
partitioned model. ``make hw`` names them from the graph as the bitstream flow
builds it (hw/budget.py ``bitstream_graph``), but FIFO sizing may keep or drop
FIFOs and so move partition indices: after the bitstream, :func:`refresh_layout`
re-measures the layout on the model finn-plus's driver was made from and reports
any name that changed; ``hw weights`` and the emulator read the names from that
layout.

Callers check for Vivado first (``fedfinn hw bitstream``); this module is only
imported when it is there.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from qonnx.core.modelwrapper import ModelWrapper

from export.finn_env import vivado_info

from .build import BITSTREAM_STEPS, FINAL_STEP, HW_STEPS, find_intermediate, load_config, run_build
from .datfiles import LAYOUT_JSON, encode, load_layout, runtime_weight_layers, write_layout


def refresh_layout(build_dir: str | Path, parent: ModelWrapper) -> dict:
    """Re-measure the runtime-weight layout on ``parent`` (the partitioned model the bitstream's driver
    was made from) into ``<build>/driver/runtime_weights``, write any file of a new name (finn's
    driver step writes the same bytes), remove files of names that are gone; report the names."""
    wdir = Path(build_dir) / "driver" / "runtime_weights"
    old = sorted(json.loads((wdir / LAYOUT_JSON).read_text())["files"]) if (wdir / LAYOUT_JSON).exists() else []
    wdir.mkdir(parents=True, exist_ok=True)
    write_layout(parent, wdir)
    new = sorted(json.loads((wdir / LAYOUT_JSON).read_text())["files"])
    files, arrays = load_layout(wdir)
    for fname, df, node in runtime_weight_layers(parent):
        if not (wdir / fname).exists():
            k = files[fname]["arrays"]
            (wdir / fname).write_text(encode(files[fname], arrays[f"lsb_{k}"], arrays[f"index_{k}"],
                                             df.get_initializer(node.input[1])))
    stale = sorted(set(p.name for p in wdir.glob("*.dat")) - set(new))
    for name in stale:  # files of names the bitstream's driver no longer has
        (wdir / name).unlink()
    return {"names_changed": old != new, "before": old, "after": new, "removed_stale_files": stale}


def run_bitstream(build_dir: str | Path) -> dict:
    info = vivado_info()
    if not info.present:
        raise RuntimeError("Vivado not found: " + "; ".join(info.missing))
    build_dir = Path(build_dir)
    cfg = copy.deepcopy(load_config(build_dir))
    find_intermediate(build_dir, FINAL_STEP)  # the folded model must be there
    cfg.steps = HW_STEPS[: HW_STEPS.index(FINAL_STEP) + 1] + BITSTREAM_STEPS
    cfg.start_step, cfg.stop_step = BITSTREAM_STEPS[0], None
    t0 = time.time()
    run_build(cfg)
    parent = ModelWrapper(str(find_intermediate(build_dir, "step_synthesize_bitfile")))
    names = refresh_layout(build_dir, parent)
    return {
        "build": str(build_dir),
        "bitfile": sorted(str(p) for p in (build_dir / "bitfile").glob("*")),
        "deploy": str(build_dir / "deploy"),
        "runtime_weight_names": names,
        "seconds": round(time.time() - t0, 1),
        "vivado": info.as_dict(),
    }
