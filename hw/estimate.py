"""Throughput, latency and resources of a folded dataflow model, everything counted.

Shared by the folding search (hw/build.py) and the build report (hw/report.py). The
model is first prepared as the bitstream flow builds it (width converters, FIFOs,
DMAs: hw/budget.py); throughput and latency come from finn-plus's cycle models on that
graph, resources from :func:`hw.budget.budget` (finn-plus's estimates plus the stated
figures for the parts it does not model, and the shell). Estimates, not synthesis
results: see docs/hardware.md.
"""

from __future__ import annotations

from export.finn_env import prepare

prepare()

from finn.analysis.fpgadataflow.dataflow_performance import dataflow_performance  # noqa: E402
from finn.transformation.fpgadataflow.annotate_cycles import AnnotateCycles  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402

from .budget import RES, budget, prepare_for_budget  # noqa: E402


def estimate(model: ModelWrapper, cfg) -> dict:
    """Throughput, latency and resource budget of a folded dataflow model for the build ``cfg``
    (an hw.build.HwBuildConfig: part, clock, board capacity, usable share)."""
    board = cfg.board_info
    prepared = prepare_for_budget(model, cfg.fpga_part, board.axi_port_width, getattr(cfg, "branch_fifos", True),
                                  uram=board.uram > 0)
    m = prepared.transform(AnnotateCycles())
    perf = m.analysis(dataflow_performance)
    b = budget(m, cfg.fpga_part, board.capacity(), cfg.usable)
    clock_hz = 1e9 / cfg.synth_clk_period_ns
    return {
        "fps": clock_hz / perf["max_cycles"],
        "latency_ms": perf["critical_path_cycles"] * cfg.synth_clk_period_ns * 1e-6,
        "max_cycles": int(perf["max_cycles"]),
        "max_cycles_node": perf.get("max_cycles_node_name"),
        "critical_path_cycles": int(perf["critical_path_cycles"]),
        "resources": {k: float(b["total"][k]) for k in RES + ("FF",)},
        "utilization": b["utilization"],
        "fits": b["fits"],
        "budget": b,
    }
