"""Is the small study's best row within 1 point of fp32 for other seeds too?

Runs study-small configurations again with other ``federation.seed`` values
(model init, client sampling, shuffling and augmentation change; the data split
stays), one resumable ``fedfinn run --continue`` each, and writes the mean of
the last three rounds per seed, the per-seed difference to fp32, and mean +-
standard deviation over seeds:

    .venv/bin/python bench/study_seeds.py --rows fp32_zstd delta_d30_b4 --seeds 0 1 2 \\
        --out results/study-small/seeds

Seed 0 is the study's own run (``runs/study_small_<row>``, run by ``make study-small``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from training.config import load_config
from training.recorder import read_metrics

REPO = Path(__file__).resolve().parents[1]


def run_dir_for(row: str, seed: int) -> tuple[Path, list[str]]:
    """The run folder of ``row`` at ``seed`` and the command that makes it."""
    config = REPO / "configs" / "study" / "small" / f"{row}.toml"
    if not config.exists():
        raise SystemExit(f"no such study-small row: {config}")
    cfg = load_config(config)
    name = cfg.run.name if seed == cfg.federation.seed else f"{cfg.run.name}_seed{seed}"
    cmd = [str(REPO / ".venv" / "bin" / "fedfinn"), "run", str(config), "--continue", "--quiet",
           "--set", f"federation.seed={seed}", "--set", f'run.name="{name}"']
    return REPO / cfg.run.out_dir / name, cmd


def last3(run_dir: Path, rounds: int) -> float:
    rows = read_metrics(run_dir)
    if len(rows) != rounds:
        raise SystemExit(f"{run_dir}: {len(rows)} of {rounds} rounds finished")
    return 100 * sum(r["test_accuracy"] for r in rows[-3:]) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", required=True, help="study-small rows; the first is the reference")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="results/study-small/seeds", help="writes OUT.json and OUT.md")
    args = ap.parse_args()

    acc: dict[str, dict[int, float]] = {}
    for row in args.rows:
        rounds = load_config(REPO / "configs" / "study" / "small" / f"{row}.toml").federation.rounds
        for seed in args.seeds:
            run_dir, cmd = run_dir_for(row, seed)
            print(f"{row} seed {seed}: {run_dir}", flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)  # --continue: a finished run is not run again
            acc.setdefault(row, {})[seed] = last3(run_dir, rounds)

    ref = args.rows[0]
    result = {"reference": ref, "seeds": args.seeds, "rows": {}}
    lines = [f"# study-small across seeds: mean of the last three rounds (%), difference to {ref}", "",
             "Same scale as results/study-small (10 clients x 1,000 images, 4 per round, 15 rounds, 5,000 "
             "test images); `federation.seed` changes init, sampling, shuffling and augmentation.", "",
             "| row | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | sd | Δ per seed (pts) | Δ mean |",
             "|---|" + "---|" * (len(args.seeds) + 4)]
    for row, by_seed in acc.items():
        vals = [by_seed[s] for s in args.seeds]
        deltas = [by_seed[s] - acc[ref][s] for s in args.seeds]
        result["rows"][row] = {"last3_mean_%": by_seed, "mean": statistics.mean(vals),
                               "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                               "delta_pts": dict(zip(args.seeds, deltas)), "delta_mean": statistics.mean(deltas)}
        r = result["rows"][row]
        lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {r['mean']:.2f} | {r['sd']:.2f} | "
                     + ", ".join(f"{d:+.2f}" for d in deltas) + f" | {r['delta_mean']:+.2f} |")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
