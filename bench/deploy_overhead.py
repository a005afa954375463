"""Round time of a Flower deployment on localhost against the simulation engine, same config, in pairs.

Runs, interleaved A/B/A/B (never at the same time) on this machine:

1. ``fedfinn run CONFIG --set federation.backend="ray"``: Flower's simulation engine;
2. ``fedfinn deploy CONFIG --nodes N``: a SuperLink and N SuperNodes on loopback
   (TLS + SuperNode authentication, the warm executor of training/fastnode.py);
3. optionally (``--plain``) ``fedfinn deploy --plain``: stock ``flower-supernode``
   processes and Flower's 3 s reply polling, i.e. the deployment out of the box.

Each run writes its run folder; this script reads their ``metrics.jsonl``
(``seconds.round``: a round's share of the run's wall time, measured by the
ServerApp in the same way under every runtime) and writes JSON with the mean
round time per run, the per-pair ratios deployment / simulation of the mean
round time and of the whole command's CPU and wall time (min / median / max),
message sizes, accuracies and the machine's load.

    python bench/deploy_overhead.py --config configs/reduced/baseline.toml --rounds 3 --pairs 3 \\
        --out results/bench/deploy_overhead.json [--plain] [--nodes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from fedfinn.measure import interleaved, machine_load, ratios, timed_command
from training.recorder import read_metrics

REPO = Path(__file__).resolve().parent.parent


def summary(run_dir: Path, wall: float) -> dict:
    rows = read_metrics(run_dir)
    rounds = [r["seconds"]["round"] for r in rows]
    return {
        "run": str(run_dir), "wall_s": round(wall, 1), "round_s": rounds,
        "mean_round_s": statistics.mean(rounds), "mean_round_s_after_first": statistics.mean(rounds[1:]) if len(rounds) > 1 else None,
        "client_train_max_s": [r["seconds"].get("client_train_max") for r in rows],
        "evaluate_s": [r["seconds"].get("evaluate") for r in rows],
        "test_accuracy": [r["test_accuracy"] for r in rows],
        "bytes_up": [r["bytes_up"] for r in rows], "bytes_down": [r["bytes_down"] for r in rows],
        "clients": [r["clients"] for r in rows],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/reduced/baseline.toml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=0, help="SuperNodes (default: federation.num_clients)")
    p.add_argument("--plain", action="store_true", help="also time stock flower-supernode processes")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    p.add_argument("--out", default="results/bench/deploy_overhead.json")
    p.add_argument("--prefix", default="bench_deploy")
    p.add_argument("--pairs", type=int, default=3)
    a = p.parse_args()
    fedfinn = str(Path(sys.executable).parent / "fedfinn")
    common = [f"federation.rounds={a.rounds}", *a.set]
    sets = lambda extra: sum((["--set", s] for s in [*common, *extra]), [])  # noqa: E731
    nodes = ["--nodes", str(a.nodes)] if a.nodes else []
    result = {"config": a.config, "rounds": a.rounds, "overrides": common, "cpus": os.cpu_count()}

    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    kinds = {"simulation": ["run"], "deployment": ["deploy", *nodes]}
    if a.plain:
        kinds["deployment_plain"] = ["deploy", *nodes, "--plain"]

    def side(kind: str, how: list[str]):
        name = f"{a.prefix}_{kind}"

        def go() -> dict:
            quiet = ["--quiet"] if how[0] == "run" else []  # (deploy prints a few lines only)
            m = timed_command([fedfinn, *how, a.config, "--overwrite", *quiet,
                               *sets(['federation.backend="ray"', f"run.name={name}"])], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL)
            return {**m, **summary(REPO / "runs" / name, m["wall_s"])}
        return go

    result["load_before"] = machine_load()
    runs = interleaved({k: side(k, how) for k, how in kinds.items()}, a.pairs)
    result["runs"] = runs
    result["load_after"] = machine_load()
    for kind in kinds:
        if kind == "simulation":
            continue
        per_pair = [d["mean_round_s"] / s["mean_round_s"] for d, s in zip(runs[kind], runs["simulation"])]
        result[f"{kind}_over_simulation"] = {
            "mean_round": {"min": min(per_pair), "median": statistics.median(per_pair), "max": max(per_pair)},
            **ratios(runs[kind], runs["simulation"]),
            "same_bytes_down": all(d["bytes_down"] == s["bytes_down"] for d, s in zip(runs[kind], runs["simulation"])),
        }
    out = REPO / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, r in result.items():
        if key.endswith("_over_simulation"):
            print(f"{key}: mean round x{r['mean_round']['median']:.2f} (min {r['mean_round']['min']:.2f}, max "
                  f"{r['mean_round']['max']:.2f}); whole command CPU x{r['cpu']['median']:.2f}, wall "
                  f"x{r['wall']['median']:.2f}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
