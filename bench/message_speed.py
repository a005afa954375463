"""How fast is a model turned into a message, and an update compressed? New code against the old.

Measures, in one process and interleaved (old, new, new, old, old, new, ...),

* quantized model -> message (``training.compress.model_to_message``) for the
  study ResNet-12 at 8, 4 and 1 weight bits and the deployable ``cnv-w2a2``
  (plus a pruned ResNet-12 and ``resnet12-bn-w4a4``), on weights after a few
  SGD steps (seeded; what a client sends after training);
* update-mode compression (``training.updates.compress_update``) of a
  ResNet-12-shaped update at several densities and bit widths;

against the same functions as they were at ``--baseline-ref`` (the commit the
speed-up started from), loaded from git into a private package so both run
side by side on the same inputs. Every case also checks that old and new
produce the same bytes (and, for updates, the same recorded values).

Throughput is MB/s of fp32 input: the model's travelling state (or the
update) as float32 bytes, divided by the time per call. Both process CPU time
and wall time are reported (min / median / max over the pairs), with the
per-pair old/new ratios, and the machine's load average at start and end.

    python bench/message_speed.py [--pairs 9] [--baseline-ref f76e62c] [--out results/bench/message_speed]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

import training
from training import compress, updates
from training.models import build_model
from training.pruning import prune_

BASELINE_REF = "f76e62c"  # main before the fast message path
MODEL_GOAL_MB_S = 500.0
UPDATE_GOAL_MB_S = 300.0


def load_baseline(ref: str):
    """``training.compress`` and ``training.updates`` (with their ``codec``) as of git ``ref``."""
    here = Path(__file__).resolve().parent
    root = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"],
                          capture_output=True, text=True, check=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="fedfinn_baseline_")) / "fedfinn_baseline"
    folder.mkdir()
    (folder / "__init__.py").write_text(f'"""training.* modules as of {ref} (bench/message_speed.py)."""\n')
    for name in ("codec", "compress", "updates"):
        source = subprocess.run(["git", "-C", root, "show", f"{ref}:training/{name}.py"],
                                capture_output=True, text=True, check=True).stdout
        (folder / f"{name}.py").write_text(source)
    package = types.ModuleType("fedfinn_baseline")
    package.__path__ = [str(folder)]
    sys.modules["fedfinn_baseline"] = package  # lets the modules' "from . import codec" resolve
    return importlib.import_module("fedfinn_baseline.compress"), importlib.import_module("fedfinn_baseline.updates")


def git_describe() -> str:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def trained_model(name: str, bits: int, steps: int = 2, seed: int = 0) -> torch.nn.Module:
    """A seeded model after a few SGD steps on random images: weights, biases and norms all moved."""
    torch.manual_seed(seed)
    model = build_model(name, 10, bits)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def fp32_bytes(values) -> int:
    return int(sum(int(np.prod(np.shape(v))) * 4 for v in values))


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def time_pairs(old, new, pairs: int, reps: int) -> dict:
    """Per-call CPU and wall seconds of each side, interleaved: pair i runs old first if i is even."""
    sides = {"old": old, "new": new}
    cpu = {"old": [], "new": []}
    wall = {"old": [], "new": []}
    for fn in (old, new):  # warm-up
        fn()
    for i in range(pairs):
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
            fn = sides[side]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                fn()
            cpu[side].append((time.process_time() - c0) / reps)
            wall[side].append((time.perf_counter() - w0) / reps)
    return {"cpu": cpu, "wall": wall}


def summarize(name: str, kind: str, nbytes: int, times: dict, reps: int, pairs: int, goal: float, **extra) -> dict:
    out = {"name": name, "kind": kind, "fp32_bytes": nbytes, "reps_per_sample": reps, "pairs": pairs, **extra}
    for side in ("old", "new"):
        cpu, wall = times["cpu"][side], times["wall"][side]
        out[side] = {
            "cpu_ms": {k: 1e3 * v for k, v in spread(cpu).items()},
            "wall_ms": {k: 1e3 * v for k, v in spread(wall).items()},
            "mb_s_cpu": {k: nbytes / 1e6 / v for k, v in spread(cpu).items()},
            "mb_s_wall": {k: nbytes / 1e6 / v for k, v in spread(wall).items()},
        }
    out["ratio_cpu"] = spread([o / n for o, n in zip(times["cpu"]["old"], times["cpu"]["new"])])
    out["ratio_wall"] = spread([o / n for o, n in zip(times["wall"]["old"], times["wall"]["new"])])
    out["goal_mb_s"] = goal
    out["meets_goal_cpu_median"] = nbytes / 1e6 / statistics.median(times["cpu"]["new"]) >= goal
    out["meets_goal_wall_median"] = nbytes / 1e6 / statistics.median(times["wall"]["new"]) >= goal
    return out


def calibrate(fn, target_s: float) -> int:
    t0 = time.process_time()
    fn()
    once = max(time.process_time() - t0, 1e-4)
    return max(3, int(round(target_s / once)))


def model_cases():
    yield "resnet12 w8", trained_model("resnet12", 8), None
    yield "resnet12 w4", trained_model("resnet12", 4), None
    yield "resnet12 w1", trained_model("resnet12", 1), None
    yield "cnv-w2a2", trained_model("cnv-w2a2", 32), None
    model = trained_model("resnet12", 4)
    yield "resnet12 w4, pruned 50%", model, prune_(model, 0.5)
    yield "resnet12-bn-w4a4", trained_model("resnet12-bn-w4a4", 32), None


def update_cases():
    rng = np.random.default_rng(0)
    shapes = {k: v.shape for k, v in compress.travelling_values(build_model("resnet12", 10, 32)).items()}
    update = {k: (rng.normal(size=s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    for density, bits in ((0.3, 4), (0.1, 8), (0.02, 4), (0.3, 1)):
        yield f"resnet12 update, density {density}, {bits} bits", update, density, bits


def run(pairs: int, ref: str, target_s: float) -> dict:
    torch.set_num_threads(1)
    old_compress, old_updates = load_baseline(ref)
    load_start = os.getloadavg()
    cases = []
    for name, model, masks in model_cases():
        nbytes = fp32_bytes(compress.travelling_state(model).values())
        new_blob = compress.model_to_message(model, masks)
        old_blob = old_compress.model_to_message(model, masks)
        fn_new = lambda: compress.model_to_message(model, masks)  # noqa: E731
        fn_old = lambda: old_compress.model_to_message(model, masks)  # noqa: E731
        reps = calibrate(fn_new, target_s)
        times = time_pairs(fn_old, fn_new, pairs, reps)
        cases.append(summarize(name, "model -> message", nbytes, times, reps, pairs, MODEL_GOAL_MB_S,
                               message_bytes=len(new_blob), bytes_equal=new_blob == old_blob))
        print(f"{name}: {cases[-1]['new']['mb_s_cpu']['median']:.0f} MB/s (old "
              f"{cases[-1]['old']['mb_s_cpu']['median']:.0f}), equal bytes {new_blob == old_blob}", flush=True)
    for name, update, density, bits in update_cases():
        nbytes = fp32_bytes(update.values())
        new_blob, new_sent = updates.compress_update(update, density, bits)
        old_blob, old_sent = old_updates.compress_update(update, density, bits)
        same = new_blob == old_blob and all(new_sent[k].tobytes() == old_sent[k].tobytes() for k in update)
        fn_new = lambda: updates.compress_update(update, density, bits)  # noqa: E731
        fn_old = lambda: old_updates.compress_update(update, density, bits)  # noqa: E731
        reps = calibrate(fn_new, target_s)
        times = time_pairs(fn_old, fn_new, pairs, reps)
        cases.append(summarize(name, "update compression", nbytes, times, reps, pairs, UPDATE_GOAL_MB_S,
                               message_bytes=len(new_blob), bytes_equal=same))
        print(f"{name}: {cases[-1]['new']['mb_s_cpu']['median']:.0f} MB/s (old "
              f"{cases[-1]['old']['mb_s_cpu']['median']:.0f}), equal bytes {same}", flush=True)
    load_end = os.getloadavg()
    import brevitas
    import zstandard

    return {
        "what": "model -> message and update-mode compression, new code vs the code at the baseline ref",
        "method": ("one process, torch.set_num_threads(1); each sample times reps_per_sample calls and "
                   "divides; pairs alternate which side runs first; MB/s = fp32 input bytes / time per call"),
        "code": {"new": git_describe(), "new_package": str(Path(training.__file__).parent), "old": ref},
        "machine": {
            "cores": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": load_end,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "brevitas": brevitas.__version__, "zstandard": zstandard.__version__,
        },
        "cases": cases,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Message speed: new code vs " + result["code"]["old"],
        "",
        f"Code: new `{result['code']['new']}`, old `{result['code']['old']}` (loaded from git). "
        f"{m['cores']} cores, load average {', '.join(f'{x:.1f}' for x in m['loadavg_start'])} at start, "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_end'])} at end; torch {m['torch']}, numpy {m['numpy']}, "
        f"brevitas {m['brevitas']}, one torch thread.",
        "",
        result["method"] + ".",
        "",
        "| case | fp32 MB | new MB/s (CPU) med [min-max] | old MB/s (CPU) med | CPU ratio old/new med [min-max] "
        "| new MB/s (wall) med | wall ratio med [min-max] | goal | same bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for c in result["cases"]:
        new, old = c["new"], c["old"]
        lines.append(
            f"| {c['name']} | {c['fp32_bytes'] / 1e6:.2f} "
            f"| {new['mb_s_cpu']['median']:.0f} [{new['mb_s_cpu']['max']:.0f}-{new['mb_s_cpu']['min']:.0f}] "
            f"| {old['mb_s_cpu']['median']:.0f} "
            f"| {c['ratio_cpu']['median']:.1f}x [{c['ratio_cpu']['min']:.1f}-{c['ratio_cpu']['max']:.1f}] "
            f"| {new['mb_s_wall']['median']:.0f} "
            f"| {c['ratio_wall']['median']:.1f}x [{c['ratio_wall']['min']:.1f}-{c['ratio_wall']['max']:.1f}] "
            f"| {c['goal_mb_s']:.0f} {'met' if c['meets_goal_cpu_median'] else 'NOT met'} "
            f"| {'yes' if c['bytes_equal'] else 'no'} |")
    lines += ["", "MB/s ranges are from the slowest to the fastest sample (max time to min time).", ""]
    lines += ["Per-call times (ms, CPU / wall, median [min-max]):", ""]
    for c in result["cases"]:
        parts = []
        for side in ("old", "new"):
            cpu, wall = c[side]["cpu_ms"], c[side]["wall_ms"]
            parts.append(f"{side} {cpu['median']:.2f} [{cpu['min']:.2f}-{cpu['max']:.2f}] / "
                         f"{wall['median']:.2f} [{wall['min']:.2f}-{wall['max']:.2f}]")
        lines.append(f"* {c['name']} ({c['pairs']} pairs x {c['reps_per_sample']} calls): " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=9, help="interleaved old/new pairs per case (>= 5)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the old code")
    parser.add_argument("--sample-seconds", type=float, default=0.15, help="CPU time of one sample of the new side")
    parser.add_argument("--out", default="results/bench/message_speed", help="output path without suffix")
    args = parser.parse_args(argv)
    if args.pairs < 5:
        parser.error("--pairs must be at least 5")
    result = run(args.pairs, args.baseline_ref, args.sample_seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
