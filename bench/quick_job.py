"""The README's main job (``make quick``) before and after an engine change, whole commands in pairs.

Each side runs the quick job's commands from its own checkout, exactly as its Makefile does after the
install: one ``run`` of ``configs/quick.toml`` per row (fp32 without entropy coding, 8-bit, 4-bit, 90 %
pruning), then the ``report``. The sides run interleaved A/B/A/B; the result is the job's wall and CPU
time per side and after / before per pair (min / median / max), with the machine's load.

    python bench/quick_job.py --before-tree ../old --before-cli training.cli --pairs 3 \\
        --out results/bench/quick_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedfinn.measure import interleaved, machine_load, ratio_text, ratios, timed_command, write_json

REPO = Path(__file__).resolve().parent.parent
ROWS = {"fp32": "compression.entropy_coding=false", "q8": "compression.weight_bits=8",
        "q4": "compression.weight_bits=4", "prune90": "compression.prune_rate=0.9"}


def job(tree: Path, cli: str):
    env = dict(os.environ, PYTHONPATH=str(tree), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")

    def go() -> dict:
        out = Path(tempfile.mkdtemp(prefix="fedfinn-quick-bench-"))
        wall = cpu = 0.0
        t0 = time.perf_counter()
        for name, setting in ROWS.items():
            m = timed_command([sys.executable, "-W", "ignore", "-m", cli, "run", "configs/quick.toml", "--overwrite",
                               "--set", f"run.name=quick_{name}", "--set", f"run.out_dir=\"{out}\"", "--set", setting],
                              cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu += m["cpu_s"]
        m = timed_command([sys.executable, "-W", "ignore", "-m", cli, "report", *[str(out / f"quick_{n}") for n in ROWS],
                           "--out", str(out / "report")], cwd=tree, env=env, stdout=subprocess.DEVNULL)
        cpu += m["cpu_s"]
        wall = time.perf_counter() - t0
        acc = [json.loads((out / f"quick_{n}" / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
               for n in ROWS]
        return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": round(os.getloadavg()[0], 2),
                "accuracy": acc}
    return go


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before-tree", required=True)
    p.add_argument("--before-cli", default="fedfinn.cli", help="the before tree's CLI module")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", default="results/bench/quick_job.json")
    args = p.parse_args()
    before = machine_load()
    runs = interleaved({"before": job(Path(args.before_tree).resolve(), args.before_cli),
                        "after": job(REPO, "fedfinn.cli")}, args.pairs)
    result = {"what": __doc__.split("\n\n")[0], "before_tree": args.before_tree, "load_before": before,
              "load_after": machine_load(), "runs": runs, "after_over_before": ratios(runs["after"], runs["before"])}
    write_json(args.out, result)
    print(f"quick job after/before: {ratio_text(result['after_over_before'])}; after: "
          f"{[m['wall_s'] for m in runs['after']]} s, before: {[m['wall_s'] for m in runs['before']]} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
