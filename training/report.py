"""Tables and plots from finished runs.

``fedfinn report RUN...`` reads each run folder (training.recorder.load_run)
and writes the poster's table (technique, final test accuracy, message MiB up
and down) as markdown and CSV, a plot of accuracy against round for every run
and a plot of accuracy against uplink message size.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .plots import plot_curves, plot_pareto
from .recorder import RunRecord, load_run


def technique(cfg: dict) -> str:
    """A run's technique in words, from its config (as parsed from config.toml)."""
    c, m = cfg.get("compression", {}), cfg.get("model", {})
    if c.get("client_bits"):
        return f"clients at {'/'.join(map(str, c['client_bits']))} bits, server {c.get('weight_bits', 32)}"
    parts = []
    if m.get("name", "resnet12") != "resnet12":
        parts.append(m["name"])
    bits, rate = c.get("weight_bits", 32), c.get("prune_rate", 0.0)
    if bits != 32:
        parts.append(f"{bits}-bit QAT")
    if rate:
        parts.append(f"pruning {rate * 100:g}%")
    if c.get("update") == "delta":
        ub = c.get("update_bits", 8)
        density_up, density_down = c.get("update_density", 0.1), c.get("update_density_down", 0.1)
        down = ("fp32 model down" if c.get("downlink") == "fp32"
                else "every entry down" if density_down >= 1 else f"down top {density_down * 100:g}%")
        up = "every entry up" if density_up >= 1 else f"top {density_up * 100:g}% up"
        parts.append(f"updates: {up}, {down}, "
                     + ("top-k over the model, " if c.get("update_topk", "tensor") == "model" else "")
                     + f"{'float' if ub == 32 else f'{ub}-bit'} values"
                     + (", error feedback" if c.get("error_feedback", True) else ", no error feedback"))
    if (bits != 32 or rate) and c.get("update") != "delta":
        up32, down32 = c.get("uplink") == "fp32", c.get("downlink") == "fp32"
        if up32 and down32:
            parts.append("fp32 both ways (poster protocol)")
        elif up32 or down32:
            parts.append("fp32 uplink" if up32 else "fp32 downlink")
    if not c.get("entropy_coding", True):
        parts.append("no entropy coding")
    elif not parts:
        parts.append("fp32 + zstd (lossless)")
    return ", ".join(parts) if parts != ["no entropy coding"] else "baseline (fp32, uncompressed)"


def run_technique(run: RunRecord) -> str:
    return technique(run.cfg)


COLUMNS = ("technique", "run", "rounds", "accuracy_%", "best_accuracy_%", "mib_up", "mib_down", "s_per_round")


def _row(r: RunRecord) -> list:
    return [technique(r.cfg), r.name, r.rounds, f"{100 * r.accuracy:.2f}", f"{100 * r.best_accuracy:.2f}",
            f"{r.mib_up:.4f}", f"{r.mib_down:.4f}", f"{r.seconds_per_round:.1f}"]


def markdown_table(runs: list[RunRecord]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(map(str, _row(r))) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    runs = [load_run(r) for r in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv",
             "curves": out / "accuracy_vs_round.png", "pareto": out / "accuracy_vs_size.png"}
    paths["markdown"].write_text(markdown_table(runs))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(_row(r) for r in runs)
    plot_curves(runs, paths["curves"], label=run_technique)
    plot_pareto(runs, paths["pareto"], label=run_technique)
    return paths


def plot_run(run_dir: str | Path) -> Path:
    """``accuracy.png`` inside the run folder."""
    return plot_curves([load_run(run_dir)], Path(run_dir) / "accuracy.png", label=run_technique)
