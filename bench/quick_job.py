"""The README's main job (``make quick``) at two commits, whole commands in pairs.

Each side is a git worktree of one commit (``--before``, ``--after``) in a temporary folder, and runs
that commit's own ``make quick`` there: its rows, its way of scheduling them, then its report. Both
use this checkout's installed venv (``VENV``, with ``PYTHONPATH`` set to the worktree, so each side
imports its own code) and the bundled data (``FEDFINN_DATA``); the install check finds the venv ready,
so the time is the job's. The sides run interleaved A/B/A/B; the result is the job's wall and CPU time
per side (CPU: every process the command waited for) and after / before per pair (min / median /
max), with the machine's load and each row's final accuracy (the two commits should agree when the
change is only scheduling).

    python bench/quick_job.py --before 1d1897f --after HEAD --pairs 3 --out results/bench/quick_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedfinn.measure import interleaved, machine_load, ratio_text, ratios, timed_command, write_json
from training.data import BUNDLED_PACK

REPO = Path(__file__).resolve().parent.parent
ROWS = ("fp32", "q8", "q4", "prune90")  # the runs/quick_<row> folders make quick leaves


def worktree(ref: str, folder: Path) -> Path:
    """A detached worktree of ``ref`` at ``folder`` (removed by :func:`drop_worktree`)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(folder), ref], check=True)
    # the venv's install stamp is older than a fresh checkout's pyproject.toml: make would reinstall the
    # venv from the worktree (re-pointing this checkout's editable install); back-date it
    os.utime(folder / "pyproject.toml", (0, 0))
    return folder


def drop_worktree(folder: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=False)
    shutil.rmtree(folder, ignore_errors=True)


def data_folder() -> str:
    """Where the bundled pack lies for this checkout (a worktree elsewhere has no ../shared beside it)."""
    if os.environ.get("FEDFINN_DATA"):
        return os.environ["FEDFINN_DATA"]
    folder = BUNDLED_PACK.parent
    if not folder.is_dir():
        raise SystemExit(f"no bundled data at {folder}: set FEDFINN_DATA")
    return str(folder)


def job(tree: Path, venv: Path):
    env = dict(os.environ, PYTHONPATH=str(tree), FEDFINN_DATA=data_folder(), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1")

    def go() -> dict:
        shutil.rmtree(tree / "runs", ignore_errors=True)
        m = timed_command(["make", "-s", "-C", str(tree), "quick", f"VENV={venv}"], env=env,
                          stdout=subprocess.DEVNULL)
        m["accuracy"] = [json.loads((tree / "runs" / f"quick_{row}" / "metrics.jsonl").read_text()
                                    .splitlines()[-1])["test_accuracy"] for row in ROWS]
        return m
    return go


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="commit of the before side")
    p.add_argument("--after", default="HEAD", help="commit of the after side")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--venv", default=str(REPO / ".venv"), help="the installed venv both sides use")
    p.add_argument("--out", default="results/bench/quick_job.json")
    args = p.parse_args()
    venv = Path(args.venv).resolve()
    if not (venv / "bin" / "fedfinn").exists():
        raise SystemExit(f"{venv} is not installed: run make install first")
    commits = {side: subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True,
                                    text=True, check=True).stdout.strip()
               for side, ref in (("before", args.before), ("after", args.after))}
    base = Path(tempfile.mkdtemp(prefix="fedfinn-quick-bench-"))
    trees = {side: worktree(commit, base / side) for side, commit in commits.items()}
    try:
        before = machine_load()
        runs = interleaved({side: job(tree, venv) for side, tree in trees.items()}, args.pairs)
    finally:
        for tree in trees.values():
            drop_worktree(tree)
    result = {"what": __doc__.split("\n\n")[0], "commits": commits, "load_before": before,
              "load_after": machine_load(), "runs": runs, "after_over_before": ratios(runs["after"], runs["before"])}
    write_json(args.out, result)
    print(f"make quick after/before: {ratio_text(result['after_over_before'])}; after: "
          f"{[m['wall_s'] for m in runs['after']]} s, before: {[m['wall_s'] for m in runs['before']]} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
