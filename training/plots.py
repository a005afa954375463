"""The figures every report shares: accuracy per round and accuracy against message size.

``fedfinn report`` and ``fedfinn study`` both draw them from :class:`~training.recorder.RunRecord`
objects; the study adds its own figures (pruning, cost model) in training.study.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: no screen on the machines this runs on

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .recorder import RunRecord  # noqa: E402

Label = Callable[[RunRecord], str]


def _name(run: RunRecord) -> str:
    return run.name


def finish(fig, path: Path, caption: str = "") -> Path:
    """Caption under the axes (wrapped), tight layout, saved as PNG."""
    if caption:
        fig.text(0.01, 0.005, "\n".join(textwrap.wrap(caption, 150)), fontsize=6, va="bottom")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(runs: list[RunRecord], path: Path, caption: str = "", label: Label = _name,
                style: Callable[[RunRecord], str] = lambda r: "-", title: str = "",
                reference: tuple[float, float, str] | None = None) -> Path:
    """Test accuracy per round, one line per run; ``reference`` = (round, accuracy %, text) marks a point."""
    fig, ax = plt.subplots(figsize=(9, 5.5) if caption else (7, 4.5))
    for r in runs:
        rounds = [x["round"] for x in r.rows]
        ax.plot(rounds, [100 * x["test_accuracy"] for x in r.rows], style(r),
                marker="o" if len(rounds) < 20 else None, label=label(r))
    if reference is not None:
        x, y, text = reference
        ax.scatter([x], [y], marker="*", s=160, color="k", zorder=5, label=text)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(runs) > 8 else 1)
    if title:
        ax.set_title(title)
    return finish(fig, path, caption)


def pareto_front(runs: list[RunRecord]) -> list[RunRecord]:
    """Runs no other run beats on both uplink message size and accuracy (mean of the last three rounds)."""
    return [r for r in runs if not any(o.mib_up <= r.mib_up and o.accuracy_last3 >= r.accuracy_last3 and
                                       (o.mib_up < r.mib_up or o.accuracy_last3 > r.accuracy_last3) for o in runs)]


def plot_pareto(runs: list[RunRecord], path: Path, caption: str = "", label: Label = _name,
                fp32_accuracy: float | None = None, title: str = "") -> Path:
    """Accuracy (mean of the last three rounds) against the uplink message (log scale), the front marked."""
    fig, ax = plt.subplots(figsize=(9, 5.5) if caption else (7, 4.5))
    front = sorted(pareto_front(runs), key=lambda r: r.mib_up)
    for r in runs:
        ax.scatter(r.mib_up, 100 * r.accuracy_last3, color="C1" if r in front else "C0")
        ax.annotate(label(r), (r.mib_up, 100 * r.accuracy_last3), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.plot([r.mib_up for r in front], [100 * r.accuracy_last3 for r in front], "C1-", alpha=0.6,
            label="Pareto front")
    if fp32_accuracy is not None:
        ax.axhline(100 * fp32_accuracy - 1, color="grey", ls=":", label="fp32 - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("uplink message per client (MiB, log scale)")
    ax.set_ylabel("test accuracy (%), mean of the last 3 rounds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return finish(fig, path, caption)
