"""Throughput, latency and resources of a folded dataflow model, from finn-plus's analytical models.

Shared by the folding search (hw/build.py) and the build report (hw/report.py).
Estimates, not synthesis results: see the report's ``estimate_source``.
"""

from __future__ import annotations

import math

from export.finn_env import prepare

prepare()

from finn.analysis.fpgadataflow.dataflow_performance import dataflow_performance  # noqa: E402
from finn.analysis.fpgadataflow.op_and_param_counts import aggregate_dict_keys  # noqa: E402
from finn.analysis.fpgadataflow.res_estimation import res_estimation  # noqa: E402
from finn.transformation.fpgadataflow.annotate_cycles import AnnotateCycles  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402


def estimate(model: ModelWrapper, cfg) -> dict:
    """Throughput, latency and resource estimates of a folded dataflow model for the build ``cfg``
    (an hw.build.HwBuildConfig: part, clock, board capacity, budget)."""
    m = model.transform(AnnotateCycles())
    perf = m.analysis(dataflow_performance)
    res = m.analysis(lambda mm: res_estimation(mm, cfg.fpga_part))
    total = aggregate_dict_keys(res)
    clock_hz = 1e9 / cfg.synth_clk_period_ns
    fps = clock_hz / perf["max_cycles"]
    cap = cfg.board_info.capacity()
    util = {k: (total.get(k, 0.0) / cap[k] if cap[k] else (0.0 if total.get(k, 0.0) == 0 else math.inf))
            for k in cap}
    fits = all(util[k] <= cfg.usable.get(k, 1.0) for k in cap)
    return {
        "fps": fps,
        "latency_ms": perf["critical_path_cycles"] * cfg.synth_clk_period_ns * 1e-6,
        "max_cycles": int(perf["max_cycles"]),
        "max_cycles_node": perf.get("max_cycles_node_name"),
        "critical_path_cycles": int(perf["critical_path_cycles"]),
        "resources": {k: float(total.get(k, 0.0)) for k in cap},
        "utilization": util,
        "fits": fits,
    }
