"""How much does fedfinn add over bare PyTorch doing the same work?

Runs, side by side on this machine:

1. fedfinn runs of ``configs/reduced/baseline.toml`` (or --config) with the
   parallel backends: ``parallel`` (forked single-thread client workers, no
   Ray) and ``ray`` (Flower's simulation engine, one single-thread client per
   core);
2. bare loops doing the same work: every round, the same sampled clients'
   images (same LDA shares, batch size, augmentation, epochs) trained by
   plain PyTorch loops, one single-thread trainer process per core, then the
   same test images evaluated with all cores. No Flower, no codec, no
   aggregation, no checkpoints.

Writes JSON with all wall times and the overhead ratio of each backend.

    python bench/overhead.py --out results/bench/overhead.json [--backends parallel ray]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import data as data_mod  # noqa: E402
from training.config import load_config  # noqa: E402
from training.models import build_model  # noqa: E402


def _bare_train(job) -> float:
    """One client's local training in a fresh single-thread process; returns seconds."""
    images, labels, epochs, lr, batch, mean, std, seed = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model("resnet12", 10, 32)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    x_all = data_mod.normalize(images, mean, std)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(data_mod.augment(x_all[idx], gen)), y_all[idx])
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.inference_mode()
def _bare_eval(model, images, labels, mean, std, batch=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        out = model(data_mod.normalize(images[i : i + batch], mean, std))
        correct += int((out.argmax(1) == torch.as_tensor(labels[i : i + batch])).sum())
    return correct / len(images)


def bare_loops(cfg, cores: int) -> dict:
    d = data_mod.load_cifar(cfg.data.dataset, cfg.data.data_dir or None)
    parts = data_mod.lda_split(d.train_y, cfg.federation.num_clients, cfg.data.alpha, cfg.data.seed)
    rng = np.random.default_rng(cfg.federation.seed)
    k = max(1, int(cfg.federation.num_clients * cfg.federation.fraction_train + 1e-9))
    test_n = cfg.data.test_images or len(d.test_y)
    pool = mp.get_context("fork").Pool(cores)  # fork before any torch op here (OpenMP and fork)
    torch.set_num_threads(cores)
    eval_model = build_model("resnet12", 10, 32)
    per_round = []
    start = time.perf_counter()
    with pool:
        for r in range(cfg.federation.rounds):
            t0 = time.perf_counter()
            clients = rng.choice(cfg.federation.num_clients, size=k, replace=False)
            jobs = []
            for c in clients:
                idx = parts[c][: cfg.data.images_per_client or None]
                jobs.append((d.train_x[idx], d.train_y[idx], cfg.train.local_epochs, cfg.train.lr,
                             cfg.train.batch_size, d.mean, d.std, r * 100 + int(c)))
            pool.map(_bare_train, jobs, chunksize=1)
            _bare_eval(eval_model, d.test_x[:test_n], d.test_y[:test_n], d.mean, d.std)
            per_round.append(time.perf_counter() - t0)
    return {"loop_seconds": time.perf_counter() - start, "per_round": per_round}


def timed(cmd: list[str]) -> float:
    """Wall time of a whole command: both sides pay interpreter start and imports."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/reduced/baseline.toml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--backends", nargs="+", default=["parallel", "ray"], choices=["parallel", "ray", "inprocess"])
    p.add_argument("--out", default="results/bench/overhead.json")
    p.add_argument("--bare-only", metavar="JSON", help=argparse.SUPPRESS)  # the bare side, run as a child
    args = p.parse_args()
    cores = os.cpu_count() or 1
    cfg = load_config(args.config, args.set)
    if args.bare_only:
        Path(args.bare_only).write_text(json.dumps(bare_loops(cfg, cores)))
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sets = sum((["--set", x] for x in args.set), [])
    print(f"bare loops: {cfg.federation.rounds} rounds on {cores} single-thread trainers", flush=True)
    bare_json = out.with_suffix(".bare.json")
    bare_seconds = timed([sys.executable, __file__, "--config", args.config, *sets, "--bare-only", str(bare_json)])
    bare = {"seconds": bare_seconds, **json.loads(bare_json.read_text())}
    bare_json.unlink()
    print(f"bare: {bare_seconds:.1f} s", flush=True)
    result = {
        "config": args.config, "overrides": args.set, "rounds": cfg.federation.rounds,
        "machine": {"cores": cores, "processor": platform.processor(), "torch": torch.__version__},
        "measured": "wall time of each whole command (interpreter start, imports, data, all rounds)",
        "bare": bare, "fedfinn": {}, "overhead": {},
    }
    fedfinn = Path(sys.executable).with_name("fedfinn")
    for backend in args.backends:
        name = f"bench_overhead_{backend}"
        seconds = timed([str(fedfinn), "run", args.config, *sets, "--overwrite", "--quiet",
                         "--set", f"run.name={name}", "--set", f"federation.backend={backend}",
                         "--set", "federation.threads_per_client=1"])
        rows = [json.loads(x) for x in (Path(cfg.run.out_dir) / name / "metrics.jsonl").read_text().splitlines()]
        result["fedfinn"][backend] = {"seconds": seconds, "per_round": [r["seconds"]["round"] for r in rows],
                                      "final_accuracy": rows[-1]["test_accuracy"]}
        result["overhead"][backend] = seconds / bare_seconds - 1
        print(f"fedfinn ({backend}) {seconds:.1f} s vs bare {bare_seconds:.1f} s: "
              f"overhead {100 * result['overhead'][backend]:+.1f}%", flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
