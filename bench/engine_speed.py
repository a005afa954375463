"""Training speed of one client before and after an engine change, measured side by side.

Each measurement is a fresh single-thread process that trains one client (``--images`` real CIFAR-10
images, batch 20, one epoch) of the study model at ``--bits`` (32 = fp32, 4 = 4-bit QAT) with the
training loop of a given source tree, and reports images per second of wall time and per CPU second.
The sides run interleaved A/B/A/B (fedfinn.measure); the result is after / before per pair,
min / median / max, with the machine's load.

    python bench/engine_speed.py --before-tree ../old --pairs 5 --out results/bench/engine_speed.json

``--before-tree`` is a checkout of the commit to compare against (``git worktree add ../old <commit>``);
"after" is this checkout, with NHWC convolutions (``train.channels_last``, what the medium study and the
quick job use) unless ``--nchw``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedfinn.measure import interleaved, machine_load, ratio_text, ratios, write_json

REPO = Path(__file__).resolve().parent.parent


def child(images: int, bits: int, channels_last: bool) -> dict:
    """Runs inside the measured process: train one client, return images/s and CPU seconds."""
    import torch

    torch.set_num_threads(1)
    from training import loop
    from training.data import load_cifar
    from training.models import build_model

    d = load_cifar("cifar10")
    x, y = d.train_x[:images], d.train_y[:images]
    torch.manual_seed(0)
    model = build_model("resnet12", 10, bits)
    kw = {}
    if "channels_last" in inspect.signature(loop.train).parameters:
        kw["channels_last"] = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    c0, t0 = time.process_time(), time.perf_counter()
    loop.train(model, x, y, epochs=1, lr=0.0316, batch_size=20, seed=1, mean=d.mean, std=d.std, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall, "images_per_cpu_s": images / cpu}


def side(tree: Path, images: int, bits: int, channels_last: bool):
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")

    def go() -> dict:
        out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", str(images), str(bits),
                              str(int(channels_last))], env=env, capture_output=True, text=True, check=True)
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": round(os.getloadavg()[0], 2)}
    return go


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before-tree", required=True, help="a checkout of the commit to compare against")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--bits", type=int, nargs="+", default=[32, 4])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--nchw", action="store_true", help="the 'after' side without channels_last")
    p.add_argument("--out", default="results/bench/engine_speed.json")
    args = p.parse_args()
    result = {"what": __doc__.split("\n\n")[0], "images": args.images, "before_tree": str(args.before_tree),
              "after_channels_last": not args.nchw, "load_before": machine_load(), "bits": {}}
    for bits in args.bits:
        runs = interleaved({"before": side(Path(args.before_tree).resolve(), args.images, bits, False),
                            "after": side(REPO, args.images, bits, not args.nchw)}, args.pairs)
        result["bits"][str(bits)] = {
            "runs": runs, "after_over_before_time": ratios(runs["after"], runs["before"]),
            "images_per_s": {k: [round(m["images_per_s"], 1) for m in v] for k, v in runs.items()},
            "images_per_cpu_s": {k: [round(m["images_per_cpu_s"], 1) for m in v] for k, v in runs.items()},
        }
        print(f"{bits}-bit: after/before time: {ratio_text(result['bits'][str(bits)]['after_over_before_time'])}",
              flush=True)
    result["load_after"] = machine_load()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
