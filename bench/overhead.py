"""How much does fedfinn add over bare PyTorch doing the same work? Measured in interleaved pairs.

Two commands do the same training, side by side on this machine, A/B/A/B:

* **fedfinn**: ``fedfinn run CONFIG`` with the ``parallel`` backend (one single-thread client worker per
  core, the global model's evaluation overlapping the next round: the engine's defaults);
* **bare**: plain PyTorch loops doing the same work at their own best setting: every round the same
  sampled clients' images (same LDA shares, batch size, augmentation, epochs, memory layout) trained
  by one single-thread worker process per core, and the same test images evaluated in a thread of the
  main process while the next round trains. No Flower, no codec, no aggregation, no checkpoints.

Both are whole commands (each pays its interpreter start, imports and data loading). For every pair
the CPU time (user + system of the command and its workers) and the wall time are taken; the result
is fedfinn / bare per pair, min / median / max, and the machine's load.

    python bench/overhead.py --pairs 3 --out results/bench/overhead.json [--config configs/reduced/baseline.toml]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedfinn.measure import interleaved, machine_load, ratio_text, ratios, timed_command, write_json
from training import data as data_mod
from training.config import load_config, sampled_per_round
from training.models import build_model
from training.runner import cores


def _bare_train(job) -> float:
    """One client's local training in a single-thread worker; returns seconds."""
    images, labels, epochs, lr, batch, mean, std, seed, channels_last = job
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model("resnet12", 10, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
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
            x = data_mod.augment(x_all[idx], gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y_all[idx])
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.inference_mode()
def _bare_eval(model, images, labels, mean, std, channels_last, batch=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = data_mod.normalize(images[i : i + batch], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == torch.as_tensor(labels[i : i + batch])).sum())
    return correct / len(images)


def bare_loops(cfg) -> dict:
    n = cores()
    d = data_mod.load_cifar(cfg.data.dataset, cfg.data.data_dir or None)
    parts = data_mod.lda_split(d.train_y, cfg.federation.num_clients, cfg.data.alpha, cfg.data.seed)
    rng = np.random.default_rng(cfg.federation.seed)
    k = sampled_per_round(cfg.federation.num_clients, cfg.federation.fraction_train)
    test_n = cfg.data.test_images or len(d.test_y)
    cl = cfg.train.channels_last
    pool = mp.get_context("fork").Pool(n, torch.set_num_threads, (1,))  # fork before any torch op here
    torch.set_num_threads(1)  # the evaluation thread beside the n training workers
    eval_model = build_model("resnet12", 10, 32)
    if cl:
        eval_model = eval_model.to(memory_format=torch.channels_last)
    evaluation = ThreadPoolExecutor(1)
    pending = None
    start = time.perf_counter()
    with pool:
        for r in range(cfg.federation.rounds):
            clients = rng.choice(cfg.federation.num_clients, size=k, replace=False)
            jobs = []
            for c in clients:
                idx = parts[c][: cfg.data.images_per_client or None]
                jobs.append((d.train_x[idx], d.train_y[idx], cfg.train.local_epochs, cfg.train.lr,
                             cfg.train.batch_size, d.mean, d.std, r * 100 + int(c), cl))
            pool.map(_bare_train, jobs, chunksize=1)
            if pending is not None:
                pending.result()
            pending = evaluation.submit(_bare_eval, eval_model, d.test_x[:test_n], d.test_y[:test_n], d.mean,
                                        d.std, cl)
        pending.result()
    evaluation.shutdown()
    return {"loop_seconds": time.perf_counter() - start}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/reduced/baseline.toml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", default="results/bench/overhead.json")
    p.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)  # the bare side, as a command
    args = p.parse_args()
    overrides = [*args.set, "federation.backend=\"parallel\"", "federation.threads_per_client=1"]
    cfg = load_config(args.config, overrides)
    if args.bare_only:
        bare_loops(cfg)
        return 0
    sets = sum((["--set", x] for x in overrides), [])
    fedfinn = str(Path(sys.executable).with_name("fedfinn"))
    before = machine_load()
    sides = {
        "bare": lambda: timed_command([sys.executable, __file__, "--config", args.config, *sets, "--bare-only"]),
        "fedfinn": lambda: timed_command([fedfinn, "run", args.config, *sets, "--overwrite", "--quiet",
                                          "--set", "run.name=\"bench_overhead\""], stdout=subprocess.DEVNULL),
    }
    runs = interleaved(sides, args.pairs)
    result = {
        "what": "fedfinn (parallel backend) against bare PyTorch loops doing the same work, whole commands, "
                "measured in interleaved pairs",
        "config": args.config, "overrides": overrides, "rounds": cfg.federation.rounds, "pairs": args.pairs,
        "machine": {"cores": cores(), "processor": platform.processor(), "torch": torch.__version__},
        "load_before": before, "load_after": machine_load(),
        "runs": runs, "fedfinn_over_bare": ratios(runs["fedfinn"], runs["bare"]),
    }
    write_json(args.out, result)
    print(f"fedfinn / bare over {args.pairs} pairs: {ratio_text(result['fedfinn_over_bare'])}; "
          f"load before {before['loadavg_1_5_15']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
