"""Where does update mode lose accuracy at ~34x? Short runs of the medium study's scale, one lever at a time.

Each variant is the medium study's ``delta_d20_b1`` row (top 20 % per tensor, 1-bit sign x mean|kept|,
error feedback both ways) with one setting changed, run for ``--rounds`` rounds (default 10) into
``results/tmp/levers/`` (``fedfinn run --continue``: finished variants are reused). The table compares
their test accuracy per round with the study's fp32 and ``delta_d20_b1`` rows over the same rounds.
These are diagnostics (short, one seed); only a 40-round row of the study answers the study's goal.

    python bench/update_directions.py --rounds 10 --out results/study-medium/update_directions
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from training.recorder import read_metrics

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "results" / "study-medium" / "runs"
BASE = "configs/study/medium/delta_d20_b1.toml"
VARIANTS = {
    "up_only": ("uplink compressed, downlink the whole fp32 model", ['compression.downlink="fp32"']),
    "dense_b1": ("every entry's sign both ways (EF-signSGD, density 1)",
                 ["compression.update_density=1.0", "compression.update_density_down=1.0"]),
    "d10_b4": ("top 10 %, 4-bit values both ways (smaller still: 0.079 MiB on the real change)",
               ["compression.update_density=0.1", "compression.update_density_down=0.1", "compression.update_bits=4"]),
    "d30_b1": ("top 30 %, 1 bit both ways (0.108 MiB on the real change: 28x)",
               ["compression.update_density=0.3", "compression.update_density_down=0.3"]),
    "model_topk": ("top 20 % of the whole model instead of each tensor (0.083 MiB on the real change: 36x)",
                   ['compression.update_topk="model"']),
}


def run_variant(name: str, settings: list[str], rounds: int, work: str) -> Path:
    sets = [f'run.out_dir="{work}"', f'run.name="{name}"', f"federation.rounds={rounds}", *settings]
    cmd = [sys.executable, "-m", "fedfinn.cli", "run", BASE, "--continue", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return REPO / work / name


def accuracies(run_dir: Path, rounds: int) -> list[float]:
    return [r["test_accuracy"] for r in read_metrics(run_dir)][:rounds]


def mib(run_dir: Path, rounds: int) -> tuple[float, float]:
    rows = read_metrics(run_dir)[:rounds]
    up = [b for r in rows for b in r["bytes_up"]]
    down = [b for r in rows for b in (r.get("bytes_down_each") or [r["bytes_down"]])]  # model mode: one broadcast
    return sum(up) / len(up) / 2**20, sum(down) / len(down) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--work", default="results/tmp/levers", help="where the variants' run folders go (relative to the repo)")
    p.add_argument("--out", default="results/study-medium/update_directions", help="path without suffix")
    args = p.parse_args()
    rows = {"fp32": ("the study's fp32 row", STUDY / "study_medium_fp32"),
            "delta_d20_b1": ("the study's row: top 20 %, 1 bit, both ways", STUDY / "study_medium_delta_d20_b1")}
    for name, (what, settings) in VARIANTS.items():
        rows[name] = (what, run_variant(name, settings, args.rounds, args.work))
    result = {"what": __doc__.split("\n\n")[0], "rounds": args.rounds, "base": BASE, "rows": {}}
    for name, (what, run_dir) in rows.items():
        acc = accuracies(run_dir, args.rounds)
        if len(acc) < args.rounds:
            raise SystemExit(f"{run_dir}: only {len(acc)} of {args.rounds} rounds")
        up, down = mib(run_dir, args.rounds)
        result["rows"][name] = {"what": what, "run": str(run_dir.relative_to(REPO)), "accuracy": acc,
                                "mib_up": round(up, 4), "mib_down": round(down, 4)}
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    ref = result["rows"]["fp32"]["accuracy"]
    lines = [f"# Update mode at ~34x: where the accuracy goes ({args.rounds} rounds, medium scale, seed 0)", "",
             f"Variants of `{BASE}` with one setting changed; Δ: test accuracy against the fp32 row at the same "
             f"round (points). Diagnostics, not study rows. `python bench/update_directions.py --rounds "
             f"{args.rounds}`.", "",
             "| variant | what | MiB up | MiB down | " + " | ".join(f"r{r}" for r in range(1, args.rounds + 1))
             + f" | Δ r{args.rounds} |",
             "|---|---|---:|---:|" + "---:|" * (args.rounds + 1)]
    for name, row in result["rows"].items():
        acc = row["accuracy"]
        lines.append(f"| {name} | {row['what']} | {row['mib_up']:.4f} | {row['mib_down']:.4f} | "
                     + " | ".join(f"{100 * a:.1f}" for a in acc) + f" | {100 * (acc[-1] - ref[-1]):+.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
