"""fedfinn's folding beside finn-examples' on the same estimator, everything counted.

Goal: more images/s at no more LUT and BRAM than finn-examples' folding, or the same images/s with fewer.

For each model (cnv-w1a1, cnv-w2a2; resnet12-bn-w4a4 with fedfinn's folding only) on the Pynq-Z2 (xc7z020,
100 MHz), builds up to the folded model with ``hw.build`` and reads the budget
(hw/budget.py: finn-plus's estimates on the graph with width converters, FIFOs and DMAs, plus
the stated figures for the DMAs, the layers finn-plus gives 0 LUT, the AXI-lite paths and the
shell):

runtime-writable weights (what fedfinn deploys):
* ``fedfinn``          - fedfinn's folding search at the default budget (70% LUT and BRAM);
* ``finn-examples``    - finn-examples' folding for the same chip
  (build/bnn-pynq/folding_config/<model>_folding_config.json, stored in hw/data/) applied to the
  same graph;
* ``fedfinn@ex-budget`` - fedfinn's search with the LUT, BRAM and DSP finn-examples' folding uses
  as the budget: more images/s at no more LUT, BRAM and DSP?
* ``fedfinn@ex-fps``   - fedfinn's search capped at finn-examples' images/s: fewer resources?

weights compiled in (what finn-examples builds: thresholds inside the MVAUs, no AXI-lite):
* ``finn-examples (const)`` and ``fedfinn@ex-budget (const)``.

finn-examples' configuration covers its own graph: its MVAUs and their sliding windows map to
ours by order; layers it has no entry for in our graph (standalone thresholds, the max-pool's
window and Pool) get the least parallelism that does not slow the design below its slowest
configured layer.

    python bench/hw_budget.py --out results/hw     # PYTHONPATH=. or the installed package

Writes ``<out>/budget_comparison.json`` and ``<out>/budget_comparison.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from export.finn_env import prepare
from export.qonnx_export import to_qonnx
from hw.build import FINAL_STEP, HW_STEPS, build, find_intermediate, make_config
from training.data import dataset_stats
from training.models import build_model, spread_batchnorm_stats

prepare()

from finn.util.basic import getHWCustomOp  # noqa: E402
from finn.util.config import extract_model_config_to_json  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "hw" / "data"
#: FINN's own post-synthesis figure for finn-examples' cnv-w1a1 folding (FINN's end-to-end test
#: `fold_cnv_large`, the same PE/SIMD) with decoupled weights, excluding the shell: Xilinx/finn pull
#: request #209, comment by maltanar, 2020-09-05 ("after" figures).
PUBLISHED_CNV_W1A1 = {"LUT": 21135, "BRAM_36K": 98, "RAMB18": 9, "BRAM_18K": 2 * 98 + 9,
                      "source": "https://github.com/Xilinx/finn/pull/209, 2020-09-05"}
FRONT = HW_STEPS[: HW_STEPS.index("step_specialize_layers") + 1]
ESTIMATE_STEPS = HW_STEPS[: HW_STEPS.index(FINAL_STEP) + 1] + ["step_report"]
FOLD_ATTRS = ["PE", "SIMD", "parallel_window", "ram_style", "ram_style_thresholds", "resType", "mem_mode",
              "runtime_writeable_weights"]


def export(name: str, path: Path, seed: int = 0) -> Path:
    """The model at initialization with randomized batch-norm statistics (estimates do not depend on
    the weight values: bit widths are fixed, accumulators sized for the worst case)."""
    torch.manual_seed(seed)
    model = build_model(name)
    spread_batchnorm_stats(model, seed)
    to_qonnx(model.eval(), path)
    return path


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fold_attr(inst) -> str | None:
    types = inst.get_nodeattr_types()
    op = inst.onnx_node.op_type
    if op.startswith("ConvolutionInputGenerator") or op.startswith("FMPadding"):
        return "SIMD" if "SIMD" in types else None
    return "PE" if "PE" in types else None


def _fold_max(inst, attr: str) -> int:
    op = inst.onnx_node.op_type
    for a in ("NumChannels", "Channels", "IFMChannels", "Labels", "MH"):
        if a in inst.get_nodeattr_types():
            try:
                v = inst.get_nodeattr(a)
                if v:
                    return int(v)
            except Exception:  # noqa: BLE001
                pass
    raise ValueError(f"no channel count for {op}")


def finn_examples_folding(model: ModelWrapper, config: dict, out: Path) -> Path:
    """finn-examples' folding on our graph (MVAUs and their windows by order), every other layer at the
    least parallelism that keeps it at or below the slowest configured layer; written as a FINN folding
    config for our node names."""
    m = ModelWrapper(copy.deepcopy(model.model))
    nodes = list(m.graph.node)
    mvaus = [n for n in nodes if n.op_type.startswith("MVAU")]
    ex_mvau = [config[k] for k in sorted((k for k in config if k.startswith("MVAU")), key=lambda k: int(k.rsplit("_", 1)[1]))]
    ex_swg = [config[k] for k in sorted((k for k in config if k.startswith("ConvolutionInputGenerator")),
                                        key=lambda k: int(k.rsplit("_", 1)[1]))]
    if len(mvaus) != len(ex_mvau):
        raise ValueError(f"{len(mvaus)} MVAUs here, {len(ex_mvau)} in finn-examples' folding")
    configured = set()
    conv_swgs = []
    for n, cfg in zip(mvaus, ex_mvau):
        inst = getHWCustomOp(n)
        for a in ("PE", "SIMD", "ram_style", "resType"):
            if a in cfg and a in inst.get_nodeattr_types():
                inst.set_nodeattr(a, cfg[a])
        configured.add(n.name)
        prod = m.find_producer(n.input[0])
        if prod is not None and prod.op_type.startswith("ConvolutionInputGenerator"):
            conv_swgs.append(prod)
    for n, cfg in zip(conv_swgs, ex_swg):
        inst = getHWCustomOp(n)
        for a in ("SIMD", "ram_style"):
            if a in cfg:
                inst.set_nodeattr(a, cfg[a])
        configured.add(n.name)
    target = max(getHWCustomOp(n).get_exp_cycles() for n in nodes if n.name in configured)
    for n in nodes:
        if n.name in configured:
            continue
        inst = getHWCustomOp(n)
        attr = _fold_attr(inst)
        if attr is None:
            continue
        try:
            cands = _divisors(_fold_max(inst, attr))
        except ValueError:
            continue
        for v in cands:
            inst.set_nodeattr(attr, v)
            if inst.get_exp_cycles() <= target:
                break
    extract_model_config_to_json(m, out, FOLD_ATTRS)
    return out


def run(name: str, work: Path, variant: str, qonnx: Path, *, runtime: bool, folding: Path | None = None,
        usable: dict | None = None, max_fps: int | None = None, front_from: Path | None = None) -> dict:
    mean, std = dataset_stats("cifar10")
    out = work / f"{name}__{variant.replace(' ', '_').replace('(', '').replace(')', '').replace('@', 'at_')}"
    if out.exists():
        shutil.rmtree(out)
    cfg = make_config(qonnx, board="Pynq-Z2", output_dir=out, name=f"{name} {variant}", mean=list(mean),
                      std=list(std), folding_config=folding, fit_to_board=folding is None,
                      max_target_fps=max_fps, runtime_weights=runtime)
    cfg.standalone_thresholds = runtime  # compiled-in weights: thresholds inside the MVAUs, as finn-examples
    if usable:
        cfg.usable = {**cfg.usable, **usable}
    cfg.steps = list(ESTIMATE_STEPS)
    if front_from is not None:  # the front half is the same: start at the folding
        (out / "intermediate_models").mkdir(parents=True)
        for s in FRONT:
            shutil.copy(front_from / "intermediate_models" / f"{s}.onnx", out / "intermediate_models" / f"{s}.onnx")
        cfg.start_step = "step_fold_to_budget"
    t0 = time.time()
    rep = build(cfg, echo=None)
    b = rep["budget"]
    return {
        "model": name, "variant": variant, "runtime_writable_weights": runtime,
        "images_per_s": rep["estimated_images_per_s"], "latency_ms": rep["estimated_latency_ms"],
        "bottleneck": rep["bottleneck_layer"],
        "LUT": round(b["total"]["LUT"]), "BRAM_18K": b["total"]["BRAM_18K"], "DSP": round(b["total"]["DSP"]),
        "utilization": {k: round(v, 4) for k, v in b["utilization"].items()},
        "usable": b["usable"], "fits": b["fits"],
        "parts": [{k: g[k] for k in ("part", "count", "LUT", "BRAM_18K", "DSP", "FF", "source")} for g in b["lines"]],
        "layers": [{k: r.get(k) for k in ("name", "PE", "SIMD", "cycles_estimate")} for r in rep["layers"]
                   if r["op_type"].startswith(("MVAU", "Thresholding", "ConvolutionInputGenerator"))],
        "build_dir": str(out), "seconds": round(time.time() - t0, 1),
    }


def _share(row: dict) -> dict:
    """The budget a design's own use sets: no more LUT, BRAM and DSP than it uses."""
    return {k: row["utilization"][k] for k in ("LUT", "BRAM_18K", "DSP")}


def compare(name: str, work: Path) -> list[dict]:
    qonnx = export(name, work / f"{name}.onnx")
    ex_cfg = json.loads((DATA / f"finn-examples_{name}_folding_config.json").read_text())
    rows = []
    ff = run(name, work, "fedfinn", qonnx, runtime=True)
    rows.append(ff)
    front = Path(ff["build_dir"])
    ex_fold = finn_examples_folding(ModelWrapper(str(find_intermediate(front, "step_specialize_layers"))),
                                    ex_cfg, work / f"{name}_finn-examples_rw.json")
    ex = run(name, work, "finn-examples", qonnx, runtime=True, folding=ex_fold, front_from=front)
    rows.append(ex)
    rows.append(run(name, work, "fedfinn@ex-budget", qonnx, runtime=True, usable=_share(ex), front_from=front))
    rows.append(run(name, work, "fedfinn@ex-fps", qonnx, runtime=True, max_fps=int(ex["images_per_s"] * 1.0001),
                    front_from=front))
    # weights compiled in, thresholds inside the MVAUs: finn-examples' own kind of design
    c_ff = run(name, work, "fedfinn (const)", qonnx, runtime=False)
    front_c = Path(c_ff["build_dir"])
    ex_fold_c = finn_examples_folding(ModelWrapper(str(find_intermediate(front_c, "step_specialize_layers"))),
                                      ex_cfg, work / f"{name}_finn-examples_const.json")
    ex_c = run(name, work, "finn-examples (const)", qonnx, runtime=False, folding=ex_fold_c, front_from=front_c)
    rows.append(ex_c)
    rows.append(run(name, work, "fedfinn@ex-budget (const)", qonnx, runtime=False, usable=_share(ex_c),
                    front_from=front_c))
    rows.append(c_ff)
    return rows


def verdict(rows: list[dict]) -> list[str]:
    out = []
    for model in sorted({r["model"] for r in rows}):
        for const in (False, True):
            sfx = " (const)" if const else ""
            by = {r["variant"]: r for r in rows if r["model"] == model}
            ex, at_b, at_f = by.get("finn-examples" + sfx), by.get("fedfinn@ex-budget" + sfx), by.get("fedfinn@ex-fps")
            if ex is None or at_b is None:
                continue
            more = at_b["images_per_s"] > ex["images_per_s"] and at_b["LUT"] <= ex["LUT"] and \
                at_b["BRAM_18K"] <= ex["BRAM_18K"] and at_b["DSP"] <= ex["DSP"]
            kind = "weights compiled in" if const else "runtime-writable weights"
            out.append(f"{model}, {kind}: within finn-examples' resources ({ex['LUT']:,} LUT, {ex['BRAM_18K']:g} BRAM18, "
                       f"{ex['DSP']} DSP) fedfinn's folding gives {at_b['images_per_s']:,.0f} images/s with "
                       f"{at_b['LUT']:,} LUT, {at_b['BRAM_18K']:g} BRAM18, {at_b['DSP']} DSP vs finn-examples' "
                       f"{ex['images_per_s']:,.0f}: " + ("more images/s at no more LUT, BRAM and DSP" if more
                                                       else "NOT more images/s within that budget"))
            if not const and at_f is not None:
                fewer = at_f["images_per_s"] >= ex["images_per_s"] * 0.999 and at_f["LUT"] < ex["LUT"] and \
                    at_f["BRAM_18K"] <= ex["BRAM_18K"] and at_f["DSP"] <= ex["DSP"]
                out.append(f"{model}, {kind}: at finn-examples' {ex['images_per_s']:,.0f} images/s fedfinn's folding "
                           f"gives {at_f['images_per_s']:,.0f} images/s with {at_f['LUT']:,} LUT, "
                           f"{at_f['BRAM_18K']:g} BRAM18, {at_f['DSP']} DSP: "
                           + ("the same images/s with fewer LUTs and no more BRAM or DSP" if fewer
                              else "not fewer resources"))
    return out


def markdown(res: dict) -> str:
    lines = ["# fedfinn's folding beside finn-examples' (Pynq-Z2, xc7z020, 100 MHz, finn-plus 1.6.1 estimates)", "",
             f"Measured {res['date']} on {res['machine']}; script: bench/hw_budget.py. Everything counted: "
             "finn-plus's estimates on the graph with width converters, minimal FIFOs and DMAs, plus stated figures "
             "for the DMAs, layers finn-plus gives 0 LUT, the AXI-lite paths of runtime-writable layers and the "
             "shell (hw/budget.py). Estimates, not synthesis.", "",
             "| model | variant | images/s | latency ms | LUT | BRAM18 | DSP | LUT % | BRAM % | fits 70% |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        u = r["utilization"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['images_per_s']:,.0f} | {r['latency_ms']:.3f} | "
                     f"{r['LUT']:,} | {r['BRAM_18K']:g} | {r['DSP']} | {100 * u['LUT']:.1f} | "
                     f"{100 * u['BRAM_18K']:.1f} | {'yes' if r['utilization']['LUT'] <= 0.7 and r['utilization']['BRAM_18K'] <= 0.7 else 'no'} |")
    lines += ["", "## Verdict", ""] + [f"* {v}" for v in res["verdict"]]
    lines += ["", "## Parts of each design (LUT / BRAM18 / DSP)", ""]
    parts = [p["part"] for p in res["rows"][0]["parts"]]
    allparts = []
    for r in res["rows"]:
        for p in r["parts"]:
            if p["part"] not in allparts:
                allparts.append(p["part"])
    lines.append("| model | variant | " + " | ".join(allparts) + " |")
    lines.append("|---|---|" + "---:|" * len(allparts))
    for r in res["rows"]:
        by = {p["part"]: p for p in r["parts"]}
        cells = [f"{by[p]['LUT']:,.0f} / {by[p]['BRAM_18K']:g} / {by[p]['DSP']:,.0f}" if p in by else "-"
                 for p in allparts]
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "Sources of the parts: " + "; ".join(f"{p['part']}: {p['source']}" for p in res["rows"][0]["parts"]),
              ""]
    del parts
    cal = [r for r in res["rows"] if r["model"] == "cnv-w1a1" and r["variant"] == "finn-examples (const)"]
    if cal:
        acc = {k: sum(p[k] for p in cal[0]["parts"] if p["part"] not in ("DMAs", "shell")) for k in ("LUT", "BRAM_18K")}
        pub = PUBLISHED_CNV_W1A1
        lines += ["## Against a published synthesis", "",
                  f"finn-examples' cnv-w1a1 folding with decoupled weights, accelerator only (no DMAs, no shell): "
                  f"this estimator {acc['LUT']:,.0f} LUT, {acc['BRAM_18K']:g} BRAM18; FINN's own post-synthesis "
                  f"figure for that folding ({pub['source']}): {pub['LUT']:,} LUT, {pub['BRAM_18K']} BRAM18 "
                  f"({pub['BRAM_36K']} RAMB36 + {pub['RAMB18']} RAMB18). Different FINN generations (2020 vs "
                  "finn-plus 1.6.1): a sanity check of the order of magnitude, not a calibration.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/hw")
    p.add_argument("--work", default="build/bench_hw_budget")
    p.add_argument("--models", default="cnv-w1a1,cnv-w2a2")
    p.add_argument("--extra", default="resnet12-bn-w4a4", help="models built with fedfinn's folding only")
    p.add_argument("--render", default=None, help="only write the markdown of this budget_comparison.json")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["verdict"] = verdict(res["rows"])
        Path(args.render).write_text(json.dumps(res, indent=2, default=float))
        Path(args.render).with_suffix(".md").write_text(markdown(res))
        return 0
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    for name in args.models.split(","):
        rows += compare(name, work)
    for name in [m for m in args.extra.split(",") if m]:  # no finn-examples folding: fedfinn's only
        rows.append(run(name, work, "fedfinn", export(name, work / f"{name}.onnx"), runtime=True))
    res = {
        "what": "fedfinn's folding beside finn-examples' on the same estimator, everything counted",
        "board": "Pynq-Z2", "part": "xc7z020clg400-1", "clock_mhz": 100.0,
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_average": os.getloadavg(), "seconds": round(time.time() - t0, 1),
        "finn_examples_folding": {m: str(DATA / f"finn-examples_{m}_folding_config.json") for m in args.models.split(",")},
        "finn_examples_source": "https://github.com/Xilinx/finn-examples/tree/810a1e7759163ac313cb7739743da4184fb9135d/"
                                "build/bnn-pynq/folding_config (one folding for all of finn-examples' Zynq boards, "
                                "Pynq-Z1 among them)",
        "rows": rows,
    }
    res["verdict"] = verdict(rows)
    (out / "budget_comparison.json").write_text(json.dumps(res, indent=2, default=float))
    (out / "budget_comparison.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
