"""Per-round runtime weights, before and after: interleaved ``fedfinn hw weights`` runs.

Goal: the same files, bit for bit, without re-running FINN's front half every round.

"Before" is the flow as it stood before the recipe (FINN's front half on every round), run from a
checkout of that commit given with ``--before`` (e.g. ``git worktree add /tmp/before f76e62c``) on a
build made by that checkout; "after" is this checkout on a build made by it. Both get the same round
models, one after the other in A/B/A/B order (interleaved, so both see the same machine load), each
as a fresh ``python -m fedfinn.cli hw weights`` process: wall time of the command (import included)
and the seconds the command reports for itself. Then the emulated board update with this checkout:
``fedfinn board bench`` (the round's ``.dat`` files made on the host, sent to a bit-exact emulated
board, 1,000 CIFAR-10 test images evaluated there).

    python bench/hw_weights_timing.py --before /tmp/before --before-build /tmp/b_old --after-build build/cnv-w1a1 \\
        --models r1.onnx,r2.onnx,r3.onnx --out results/hw/weights_timing

Load average and CPU time are recorded with every run (2 shared cores: interleaving matters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]


def hw_weights(tree: Path, build: Path, model: Path, out: Path, extra: list[str] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "fedfinn.cli", "hw", "weights", str(build), str(model), "--out", str(out),
                        *extra], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"hw weights failed in {tree}: {p.stderr[-2000:]}")
    rec = json.loads((out / "weights.json").read_text())
    return {"wall_s": round(wall, 3), "inside_s": rec["seconds"], "path": rec.get("path", "finn"),
            "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3), "load": round(load, 2)}


def stats(xs: list[float]) -> dict:
    return {"min": round(min(xs), 3), "median": round(median(xs), 3), "max": round(max(xs), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the commit before (its repository root)")
    p.add_argument("--before-build", required=True, help="a `hw build` folder made by that checkout")
    p.add_argument("--after-build", required=True, help="a `hw build` folder made by this checkout")
    p.add_argument("--models", required=True, help="comma-separated round models (QONNX)")
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs per model")
    p.add_argument("--board-images", type=int, default=1000)
    p.add_argument("--board-rounds", type=int, default=3)
    p.add_argument("--out", default="results/hw/weights_timing")
    args = p.parse_args(argv)
    before, after = Path(args.before).absolute(), REPO
    models = [Path(m).absolute() for m in args.models.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedfinn-wtiming-") as tmp:
        for k in range(args.pairs):
            for m in models:
                for side, tree, build in (("before", before, Path(args.before_build)), ("after", after, Path(args.after_build))):
                    r = hw_weights(tree, build, m, Path(tmp) / f"{side}_{k}_{m.stem}")
                    runs.append({"side": side, "pair": k, "model": m.name, **r})
                    print(json.dumps(runs[-1]), flush=True)
        # the emulated board update with this checkout: weights + send + evaluate
        bench_json = Path(tmp) / "board.json"
        env = {**os.environ, "PYTHONPATH": str(after), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        load = os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "fedfinn.cli", "board", "bench", "--build", str(args.after_build),
                        "--model", str(models[0]), "-n", str(args.board_images), "--modes", "bitexact",
                        "--rounds", str(args.board_rounds), "--json", str(bench_json)],
                       cwd=after, env=env, check=True, capture_output=True)
        board = json.loads(bench_json.read_text())
        board["load_before"] = round(load, 2)
    res = {"what": "per-round `hw weights`, before (FINN's front half every round) and after (recorded recipe); "
                   "emulated board update after",
           "machine": f"{platform.machine()} {os.cpu_count()} cores, shared", "date": time.strftime("%Y-%m-%d"),
           "before": str(before), "before_build": args.before_build, "after_build": args.after_build,
           "runs": runs, "board_bench": board}
    pairs = []
    for b in (r for r in runs if r["side"] == "before"):
        a = next(r for r in runs if r["side"] == "after" and r["pair"] == b["pair"] and r["model"] == b["model"])
        pairs.append({"model": b["model"], "pair": b["pair"], "wall_ratio": round(b["wall_s"] / a["wall_s"], 2),
                      "inside_ratio": round(b["inside_s"] / a["inside_s"], 2)})
    res["pairs"] = pairs
    res["summary"] = {side: {k: stats([r[k] for r in runs if r["side"] == side]) for k in ("wall_s", "inside_s", "cpu_s", "load")}
                      for side in ("before", "after")}
    res["summary"]["ratio_before_over_after"] = {k: stats([q[k] for q in pairs]) for k in ("wall_ratio", "inside_ratio")}
    per_round = [r for r in board["modes"]["bitexact"]["rounds"]]
    res["summary"]["board_update"] = {
        "host_dat_s": board.get("host_seconds_dat"),
        "host_dat_first_s": board.get("host_seconds_dat_first"),
        "agent_cpu_s_per_round": stats([r.get("agent_cpu_seconds", float("nan")) for r in per_round]),
        "board_s_per_round": stats([r["seconds_board"] for r in per_round]),
        "weights_s_per_round": stats([r["seconds_weights"] for r in per_round]),
        "evaluate_s_per_round": stats([r["seconds_evaluate"] for r in per_round]),
        "images": board["images"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    s = res["summary"]
    md = ["# `hw weights` per round, before and after; emulated board update", "",
          f"Measured {res['date']} on {res['machine']}; bench/hw_weights_timing.py; load average "
          f"{s['before']['load']['min']}-{max(s['before']['load']['max'], s['after']['load']['max'])} while measuring. "
          f"{len(pairs)} interleaved A/B pairs (before, after) over {len(models)} round models.", "",
          "| | wall s (min / median / max) | inside the command s | CPU s | path |", "|---|---|---|---|---|"]
    for side in ("before", "after"):
        q = s[side]
        paths = sorted({r["path"] for r in runs if r["side"] == side})
        md.append(f"| {side} | {q['wall_s']['min']} / {q['wall_s']['median']} / {q['wall_s']['max']} | "
                  f"{q['inside_s']['min']} / {q['inside_s']['median']} / {q['inside_s']['max']} | "
                  f"{q['cpu_s']['min']} / {q['cpu_s']['median']} / {q['cpu_s']['max']} | {', '.join(paths)} |")
    r = s["ratio_before_over_after"]
    md += ["", f"Ratio before/after per pair: wall {r['wall_ratio']['min']} / {r['wall_ratio']['median']} / "
               f"{r['wall_ratio']['max']}, inside the command {r['inside_ratio']['min']} / "
               f"{r['inside_ratio']['median']} / {r['inside_ratio']['max']} (min / median / max).", "",
           "Emulated board update (after; `fedfinn board bench`, bit-exact agent, "
           f"{s['board_update']['images']} test images, load {board['load_before']} at start): host `.dat` "
           f"{s['board_update']['host_dat_s']} s in a process that made them before "
           f"({s['board_update']['host_dat_first_s']} s the first time, importing finn); per round on the board: weights "
           f"{s['board_update']['weights_s_per_round']['median']} s + evaluation "
           f"{s['board_update']['evaluate_s_per_round']['median']} s (median; board total min / median / max "
           f"{s['board_update']['board_s_per_round']['min']} / {s['board_update']['board_s_per_round']['median']} / "
           f"{s['board_update']['board_s_per_round']['max']} s; the agent's CPU seconds per round "
           f"{s['board_update']['agent_cpu_s_per_round']['min']} / {s['board_update']['agent_cpu_s_per_round']['median']} / "
           f"{s['board_update']['agent_cpu_s_per_round']['max']}).", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
