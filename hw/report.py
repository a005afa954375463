"""The build report: ``report/hw_report.json`` and ``report/hw_report.md``."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from export.finn_env import prepare, vivado_info

prepare()

from finn.analysis.fpgadataflow.res_estimation import res_estimation  # noqa: E402
from finn.util.fpgadataflow import is_fpgadataflow_node  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402

from .estimate import estimate  # noqa: E402

RES_KEYS = ("LUT", "FF", "BRAM_18K", "DSP", "URAM")


def layer_table(model: ModelWrapper) -> list[dict]:
    """Per-layer folding and data types of a folded dataflow model."""
    rows = []
    for n in model.graph.node:
        if not is_fpgadataflow_node(n):
            continue
        inst = getCustomOp(n)
        attrs = inst.get_nodeattr_types()
        row = {"name": n.name, "op_type": n.op_type}
        for a in ("PE", "SIMD", "MW", "MH", "weightDataType", "inputDataType", "outputDataType",
                  "accDataType", "mem_mode", "runtime_writeable_weights", "cycles_estimate"):
            if a in attrs:
                try:
                    row[a] = inst.get_nodeattr(a)
                except Exception:
                    pass
        rows.append(row)
    return rows


def write_report(cfg, model: ModelWrapper) -> dict:
    out = Path(cfg.output_dir)
    rep_dir = cfg.get_report_directory()
    est = estimate(model, cfg)
    board = cfg.board_info
    cap = board.capacity()
    rt_dir = out / "driver" / "runtime_weights"
    rt_files = sorted(p.name for p in rt_dir.glob("*.dat")) if rt_dir.exists() else []
    ops = {}
    if (rep_dir / "op_and_param_counts.json").exists():
        ops = json.loads((rep_dir / "op_and_param_counts.json").read_text()).get("total", {})
    per_layer = model.analysis(lambda m: res_estimation(m, cfg.fpga_part))
    no_lut = [name for name, r in per_layer.items() if float(r.get("LUT", 0)) == 0.0]
    b = est["budget"]
    search = []
    if (rep_dir / "folding_search.json").exists():
        search = json.loads((rep_dir / "folding_search.json").read_text())
    rep = {
        "name": cfg.name,
        "model": str(cfg.model_path),
        "board": board.name,
        "part": board.part,
        "clock_mhz": round(cfg.clock_mhz, 3),
        "estimated_images_per_s": round(est["fps"], 1),
        "estimated_latency_ms": round(est["latency_ms"], 4),
        "max_cycles": est["max_cycles"],
        "bottleneck_layer": est["max_cycles_node"],
        "critical_path_cycles": est["critical_path_cycles"],
        "resources": {k: round(est["resources"][k], 1) for k in RES_KEYS},
        "capacity": cap,
        "utilization": {k: round(est["utilization"][k], 4) for k in RES_KEYS if k in est["utilization"]},
        "usable": {k: b["usable"][k] for k in b["usable"]},
        "fits": est["fits"],
        "budget": b,
        "weight_stream_cap_bits_per_pe": cfg.mvau_wwidth_max,
        "bram36_equivalent": round(est["resources"]["BRAM_18K"] / 2, 1),
        "ff_estimated": False,
        "layers_without_lut_estimate": no_lut,
        "ops_and_params": ops,
        "layers": layer_table(model),
        "runtime_weights": cfg.runtime_weights,
        "runtime_weight_files": rt_files,
        "folding_search": search,
        "vivado": vivado_info().as_dict(),
        "finn_plus": version("finn-plus"),
        "estimate_source": "finn-plus analytical estimates (res_estimation, dataflow_performance) on the "
        "graph as the bitstream flow builds it (width converters, minimal FIFOs, DMAs), plus stated "
        "per-instance figures for what finn-plus does not model (DMAs, layers it gives 0 LUT, the "
        "AXI-lite adapters of runtime-writable layers) and the shell: see budget.lines and their "
        "sources. Not post-synthesis numbers; flip-flops only for the stated parts",
    }
    (rep_dir / "hw_report.json").write_text(json.dumps(rep, indent=2))
    (rep_dir / "hw_report.md").write_text(markdown(rep))
    return rep


def markdown(rep: dict) -> str:
    lines = [
        f"# Hardware build: {rep['name']} on {rep['board']}",
        "",
        f"- model: `{rep['model']}`",
        f"- part: {rep['part']}, clock {rep['clock_mhz']:g} MHz",
        f"- estimated throughput: **{rep['estimated_images_per_s']:,.1f} images/s**"
        f" (bottleneck {rep['bottleneck_layer']}, {rep['max_cycles']:,} cycles/image)",
        f"- estimated latency: **{rep['estimated_latency_ms']:.3f} ms**"
        f" ({rep['critical_path_cycles']:,} cycles)",
        f"- fits the board: **{'yes' if rep['fits'] else 'NO'}**"
        " (budget = share of capacity left to the accelerator)",
        f"- runtime-writable weight/threshold files: {len(rep['runtime_weight_files'])}",
        "",
        "The budget, part by part (stated figures are labelled; sources in hw/budget.py):",
        "",
        "| part | count | LUT | BRAM_18K | DSP | source |",
        "|---|---:|---:|---:|---:|---|",
    ]
    b = rep["budget"]
    for g in b["lines"]:
        lines.append(f"| {g['part']} | {g['count']} | {g['LUT']:,.0f} | {g['BRAM_18K']:,.1f} | {g['DSP']:,.0f} | "
                     f"{g['source']} |")
    lines += ["", "| resource | total | capacity | utilization | budget |", "|---|---:|---:|---:|---:|"]
    for k in ("LUT", "BRAM_18K", "DSP", "URAM"):
        lines.append(
            f"| {k} | {rep['resources'][k]:,.0f} | {rep['capacity'][k]:,} | "
            f"{100 * rep['utilization'][k]:.1f}% | {100 * rep['usable'][k]:.0f}% |"
        )
    lines.append(f"| FF | {rep['resources']['FF']:,.0f} (stated parts only) | {rep['capacity']['FF']:,} | - | "
                 "not checked |")
    lines += ["", "Not counted: " + "; ".join(b["not_counted"]) + "."]
    if rep["layers_without_lut_estimate"]:
        lines += ["", f"{len(rep['layers_without_lut_estimate'])} layers finn-plus has no LUT model for (counted "
                  "with the stated stand-in): " + ", ".join(rep["layers_without_lut_estimate"])]
    lines += ["", "| layer | op | PE | SIMD | weights | cycles |", "|---|---|---:|---:|---|---:|"]
    for r in rep["layers"]:
        lines.append(
            f"| {r['name']} | {r['op_type']} | {r.get('PE', '')} | {r.get('SIMD', '')} | "
            f"{r.get('weightDataType', '')} | {r.get('cycles_estimate', '')} |"
        )
    if rep.get("step_times_s"):
        lines += ["", "Step times (s): " + ", ".join(f"{k} {v:g}" for k, v in rep["step_times_s"].items())]
    lines += ["", f"Estimates: {rep['estimate_source']}.", ""]
    return "\n".join(lines)
