"""Round time of a Flower deployment on localhost against the simulation engine, same config.

Runs one after the other (never at the same time) on this machine:

1. ``fedfinn run CONFIG --set federation.backend="ray"``: Flower's simulation engine;
2. ``fedfinn deploy CONFIG --nodes N``: a SuperLink and N SuperNodes on loopback
   (TLS + SuperNode authentication, the warm executor of training/fastnode.py);
3. optionally (``--plain``) ``fedfinn deploy --plain``: stock ``flower-supernode``
   processes and Flower's 3 s reply polling, i.e. the deployment out of the box.

Each writes its own run folder; this script reads their ``metrics.jsonl``
(``seconds.round``: from sampling to the end of the test pass, measured by the
ServerApp in the same way under every runtime) and writes JSON with the mean
round time, the overhead of each deployment over the simulation, end-to-end
wall times, message sizes and accuracies.

    python bench/deploy_overhead.py --config configs/reduced/baseline.toml --rounds 3 \\
        --out results/bench/deploy_overhead.json [--plain] [--nodes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.recorder import read_metrics  # noqa: E402


def timed(argv: list[str]) -> float:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO, env=env)
    return time.perf_counter() - t0


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
    a = p.parse_args()
    fedfinn = str(Path(sys.executable).parent / "fedfinn")
    common = [f"federation.rounds={a.rounds}", *a.set]
    sets = lambda extra: sum((["--set", s] for s in [*common, *extra]), [])  # noqa: E731
    nodes = ["--nodes", str(a.nodes)] if a.nodes else []
    result = {"config": a.config, "rounds": a.rounds, "overrides": common, "cpus": os.cpu_count()}

    name = f"{a.prefix}_sim"
    wall = timed([fedfinn, "run", a.config, "--overwrite", "--quiet", *sets(['federation.backend="ray"', f"run.name={name}"])])
    result["simulation"] = summary(REPO / "runs" / name, wall)

    name = f"{a.prefix}_deploy"
    wall = timed([fedfinn, "deploy", a.config, *nodes, "--overwrite", *sets(['federation.backend="ray"', f"run.name={name}"])])
    result["deployment"] = summary(REPO / "runs" / name, wall)

    if a.plain:
        name = f"{a.prefix}_plain"
        wall = timed([fedfinn, "deploy", a.config, *nodes, "--plain", "--overwrite",
                      *sets(['federation.backend="ray"', f"run.name={name}"])])
        result["deployment_plain"] = summary(REPO / "runs" / name, wall)

    sim = result["simulation"]
    for key in ("deployment", "deployment_plain"):
        if key in result:
            dep = result[key]
            dep["overhead_pct"] = 100 * (dep["mean_round_s"] / sim["mean_round_s"] - 1)
            if dep["mean_round_s_after_first"] and sim["mean_round_s_after_first"]:
                dep["overhead_pct_after_first"] = 100 * (dep["mean_round_s_after_first"] / sim["mean_round_s_after_first"] - 1)
            dep["same_bytes_down"] = dep["bytes_down"] == sim["bytes_down"]
    out = REPO / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("simulation", "deployment", "deployment_plain"):
        if key in result:
            r = result[key]
            print(f"{key:17s} mean round {r['mean_round_s']:.2f} s (after the first: {r['mean_round_s_after_first']}), "
                  f"wall {r['wall_s']} s, overhead {r.get('overhead_pct', 0):+.1f} %, accuracy {r['test_accuracy']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
