"""Per-round board update time in emulation : weights + evaluation of N test images.

What the federated server does after each round with ``[hardware] boards``,
timed piece by piece on one bit-exact emulated board (``python -m client_pynq
serve --emulate BUILD``) and one fast-mode board:

1. compile once: ``hw build`` of round 1's global model (the bitstream's build);
2. for each later round: the host makes the round's runtime-weight files from
   its checkpoint (``hw weights``), the board receives them, evaluates the
   first N real CIFAR-10 test images and replies; the host's PyTorch accuracy
   on the same images is recorded beside it (bit-exact boards must match it).

Needs a finished federated run of a deployable model, e.g.
``fedfinn run configs/reduced/cnv_w2a2.toml``.

    .venv/bin/python bench/board_round.py --run runs/reduced_cnv_w2a2 --images 1000 \\
        --out results/bench/board_round.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export import to_qonnx
from fedfinn.boards import measure_round
from training import loop
from training.compress import message_to_model
from training.config import load_config
from training.task import dataset, make_model, test_data

REPO = Path(__file__).resolve().parents[1]


def start_agent(build: Path, work: Path, name: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port_file = work / f"{name}.port"
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 (lives as long as the agent)
    cmd = [sys.executable, "-m", "client_pynq", "serve", "--emulate", str(build), "--port", "0",
           "--port-file", str(port_file), "--exit-after-idle", "600", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not port_file.exists():
        if proc.poll() is not None or time.time() - t0 > 300:
            raise RuntimeError(f"agent {name} did not start: {(work / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="runs/<name> of a deployable model (checkpoints/round_NNN.ffnc)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--board", default="Pynq-Z2")
    p.add_argument("--out", default="results/bench/board_round.json")
    args = p.parse_args(argv)

    run_dir = Path(args.run)
    if not (run_dir / "config.toml").exists():
        p.error(f"{run_dir} is not a run folder; run e.g. `fedfinn run configs/reduced/cnv_w2a2.toml` first")
    cfg = load_config(run_dir / "config.toml", [])
    ckpts = sorted((run_dir / "checkpoints").glob("round_*.ffnc"))
    if len(ckpts) < 2:
        p.error(f"{run_dir} needs at least 2 checkpoints (round 1 builds, later rounds update)")
    x, y = test_data(cfg)
    x, y = x[: args.images], y[: args.images]
    d = dataset(cfg)

    def model_of(ckpt: Path):
        m = make_model(cfg)
        message_to_model(m, ckpt.read_bytes())
        return m

    work = Path(tempfile.mkdtemp(prefix="fedfinn-board-bench-"))
    to_qonnx(model_of(ckpts[0]), work / "round_001.onnx")
    build = work / "build"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fedfinn.cli", "hw", "build", str(work / "round_001.onnx"), "--board",
                    args.board, "--out", str(build), "--quiet"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    build_s = time.time() - t0
    agents = [start_agent(build, work, "bitexact"),
              start_agent(build, work, "fast", "--mode", "fast")]
    rounds = []
    try:
        for ckpt in ckpts[1:]:
            r = int(ckpt.stem.split("_")[1])
            model = model_of(ckpt)
            _, host_acc = loop.evaluate(model, x, y, batch_size=500, mean=d.mean, std=d.std)
            t0 = time.time()
            entries = measure_round([a for _, a in agents], model, images=x, labels=y, build=build, server_round=r)
            wall = time.time() - t0
            for e in entries:
                if not e.get("ok"):
                    raise RuntimeError(f"round {r}: {e}")
            rounds.append({"round": r, "host_accuracy": host_acc, "seconds_round_all_boards": round(wall, 3),
                           "boards": entries})
            b = entries[0]
            print(f"round {r}: host acc {host_acc:.4f} | bit-exact board {b['accuracy']:.4f} "
                  f"(host hw-weights {b.get('seconds_host_hw_weights')} s, send {b['seconds_weights']} s, "
                  f"evaluate {b['seconds_evaluate']} s = {b['images_per_s']:.0f} img/s) | fast "
                  f"{entries[1]['accuracy']:.4f} ({entries[1]['images_per_s']:.0f} img/s) | all {wall:.2f} s")
    finally:
        for proc, _ in agents:
            proc.terminate()
    exact = [r["boards"][0] for r in rounds]
    update = [e["seconds_host_hw_weights"] + e["seconds_weights"] + e["seconds_evaluate"] for e in exact]
    result = {
        "what": "per-round board update in emulation: host hw-weights + send + evaluate N test images",
        "run": str(run_dir), "model": cfg.model.name, "board": args.board, "images": len(y),
        "machine": f"{platform.node()} {os.cpu_count()} cores", "load_before": os.getloadavg(),
        "build_seconds": round(build_s, 1),
        "bit_exact_equals_host": all(e["accuracy"] == r["host_accuracy"] for e, r in zip(exact, rounds)),
        "update_seconds_bit_exact": [round(u, 3) for u in update],
        "rounds": rounds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"bit-exact == host every round: {result['bit_exact_equals_host']}; "
          f"update (hw-weights + send + evaluate {len(y)} images): {result['update_seconds_bit_exact']} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
