"""Tables and plots from finished runs.

``fedfinn report RUN...`` reads each run's config and metrics and writes the
poster's table (technique, final test accuracy, message MiB up and down) as
markdown and CSV, a plot of accuracy against round for every run and a plot
of accuracy against uplink message size. Runs that measured their rounds on
boards (``[hardware]``) also get ``boards.md`` / ``boards.csv`` (on-device
accuracy and images/s per round and board) and ``boards_<run>.png``.
"""

from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .codec import mib
from .recorder import read_metrics


@dataclass
class RunSummary:
    name: str
    technique: str
    rounds: int
    accuracy: float  # final round's test accuracy
    best_accuracy: float
    mib_up: float  # mean uplink message per client, over all rounds
    mib_down: float  # mean downlink message, over all rounds
    seconds_per_round: float
    curve: list[tuple[int, float]]


def technique(cfg: dict) -> str:
    c, m = cfg.get("compression", {}), cfg.get("model", {})
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
        down = ("fp32 model down" if c.get("downlink") == "fp32"
                else f"down top {c.get('update_density_down', 0.1) * 100:g}%")
        parts.append(f"updates: top {c.get('update_density', 0.1) * 100:g}% up, {down}, "
                     f"{'float' if ub == 32 else f'{ub}-bit'} values"
                     + (", error feedback" if c.get("error_feedback", True) else ", no error feedback"))
    if c.get("downlink") == "fp32" and (bits != 32 or rate) and c.get("update") != "delta":
        parts.append("fp32 downlink")
    if not c.get("entropy_coding", True):
        parts.append("no entropy coding")
    elif not parts:
        parts.append("fp32 + zstd (lossless)")
    return ", ".join(parts) if parts != ["no entropy coding"] else "baseline (fp32, uncompressed)"


def summarize(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.toml)")
    cfg = tomllib.loads(cfg_path.read_text())
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no finished round (metrics.jsonl is empty)")
    ups = [b for r in rows for b in r["bytes_up"]]
    downs = [r["bytes_down"] for r in rows]
    return RunSummary(
        name=run_dir.name,
        technique=technique(cfg),
        rounds=rows[-1]["round"],
        accuracy=rows[-1]["test_accuracy"],
        best_accuracy=max(r["test_accuracy"] for r in rows),
        mib_up=mib(sum(ups) / len(ups)) if ups else float("nan"),
        mib_down=mib(sum(downs) / len(downs)),
        seconds_per_round=sum(r["seconds"].get("round", 0) for r in rows) / len(rows),
        curve=[(r["round"], r["test_accuracy"]) for r in rows],
    )


COLUMNS = ("technique", "run", "rounds", "accuracy_%", "best_accuracy_%", "mib_up", "mib_down", "s_per_round")


def _row(s: RunSummary) -> list:
    return [s.technique, s.name, s.rounds, f"{100 * s.accuracy:.2f}", f"{100 * s.best_accuracy:.2f}",
            f"{s.mib_up:.4f}", f"{s.mib_down:.4f}", f"{s.seconds_per_round:.1f}"]


def markdown_table(summaries: list[RunSummary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(map(str, _row(s))) + " |" for s in summaries]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    summaries = [summarize(r) for r in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv",
             "curves": out / "accuracy_vs_round.png", "pareto": out / "accuracy_vs_size.png"}
    paths["markdown"].write_text(markdown_table(summaries))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(_row(s) for s in summaries)
    plot_curves(summaries, paths["curves"])
    plot_pareto(summaries, paths["pareto"])
    paths.update(write_board_report(run_dirs, out))
    return paths


BOARD_COLUMNS = ("run", "round", "board", "ok", "host_accuracy", "board_accuracy", "images_per_s",
                 "latency_ms_p50", "power_w", "mode", "error")


def write_board_report(run_dirs: list[str | Path], out: Path) -> dict[str, Path]:
    """On-device figures of the runs that have them (nothing is written for runs without boards)."""
    from client_pynq.host import plot as plot_boards
    from client_pynq.host import summarize as board_records
    from client_pynq.host import table as board_table

    measured = []
    for run_dir in run_dirs:
        rows = read_metrics(Path(run_dir))
        if any(row.get("boards") for row in rows):
            measured.append((Path(run_dir).name, rows))
    if not measured:
        return {}
    paths = {"boards_markdown": out / "boards.md", "boards_csv": out / "boards.csv"}
    paths["boards_markdown"].write_text("".join(f"## {name}\n\n{board_table(rows)}\n\n" for name, rows in measured))
    with open(paths["boards_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BOARD_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for name, rows in measured:
            w.writerows({"run": name, **rec} for rec in board_records(rows))
    for name, rows in measured:
        png = plot_boards(rows, out / f"boards_{name}.png")
        if png is not None:
            paths[f"boards_plot_{name}"] = png
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summaries: list[RunSummary], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        rounds, acc = zip(*s.curve)
        ax.plot(rounds, [100 * a for a in acc], marker="o" if len(rounds) < 20 else None, label=s.technique)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(summaries: list[RunSummary], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        ax.scatter(s.mib_up, 100 * s.accuracy)
        ax.annotate(s.technique, (s.mib_up, 100 * s.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("uplink message per client (MiB, log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> Path:
    """accuracy.png inside the run folder (and boards.png where the rounds were measured on boards)."""
    path = Path(run_dir) / "accuracy.png"
    plot_curves([summarize(run_dir)], path)
    rows = read_metrics(Path(run_dir))
    if any(r.get("boards") for r in rows):
        from client_pynq.host import plot as plot_boards

        plot_boards(rows, Path(run_dir) / "boards.png")
    return path
