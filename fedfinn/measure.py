"""Measuring on a shared, noisy machine: two things compared side by side, never one after the other.

* :func:`timed_command` runs a command and returns its wall time and the CPU time of the command and
  every process it waited for (user + system, from ``getrusage(RUSAGE_CHILDREN)``);
* :func:`interleaved` runs two (or more) sides A/B/A/B... for ``pairs`` rounds, alternating which side
  goes first, so a slow minute of the machine hits both;
* :func:`ratios` reports a side's per-pair ratio to a reference side as min / median / max, for CPU
  time and wall time (CPU time is the steadier: another process on the cores slows the wall clock
  more than the work);
* :func:`machine_load` says how busy the machine was (load averages, the busiest other processes).

Every benchmark under bench/ that compares two things uses these.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil


def timed_command(argv: list[str], **kw) -> dict:
    """Run ``argv`` (check=True); its wall seconds and CPU seconds (with its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "load": round(os.getloadavg()[0], 2)}


def timed_call(fn: Callable[[], dict | None]) -> dict:
    """Call ``fn`` in this process; its wall and this process's CPU seconds (plus what ``fn`` returns)."""
    c0, t0 = time.process_time(), time.perf_counter()
    extra = fn() or {}
    return {"wall_s": round(time.perf_counter() - t0, 6), "cpu_s": round(time.process_time() - c0, 6),
            "load": round(os.getloadavg()[0], 2), **extra}


def interleaved(sides: dict[str, Callable[[], dict]], pairs: int, say=print) -> dict[str, list[dict]]:
    """Each side's measurements, the sides run in turns (the first side of each pair alternates)."""
    names = list(sides)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(pairs):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            m = sides[name]()
            out[name].append(m)
            if say:
                say(f"pair {i + 1}/{pairs} {name}: wall {m['wall_s']:.3f} s, cpu {m['cpu_s']:.3f} s, "
                    f"load {m['load']}")
    return out


def _spread(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4), "each": [round(v, 4) for v in values]}


def ratios(side: list[dict], reference: list[dict]) -> dict:
    """Per-pair ratios side / reference of CPU time and wall time (min / median / max)."""
    return {key: _spread([a[f"{key}_s"] / b[f"{key}_s"] for a, b in zip(side, reference)]) for key in ("cpu", "wall")}


def ratio_text(r: dict) -> str:
    """One line of :func:`ratios`' result: median (min, max) for CPU and wall time."""
    return (f"CPU {r['cpu']['median']:.3f} (min {r['cpu']['min']:.3f}, max {r['cpu']['max']:.3f}), "
            f"wall {r['wall']['median']:.3f} (min {r['wall']['min']:.3f}, max {r['wall']['max']:.3f})")


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """A benchmark's result as indented JSON at ``path`` (its folder made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def machine_load(top: int = 5) -> dict:
    """Load averages and the busiest processes right now (other work on the same cores)."""
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            procs.append((p.cpu_percent(interval=None), p))
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for _, p in procs:
        try:
            busy.append((p.cpu_percent(interval=None), " ".join(p.info["cmdline"] or [p.info["name"]])[:100]))
        except psutil.Error:
            pass
    busy.sort(reverse=True)
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "cores": len(os.sched_getaffinity(0)),
            "busiest": [{"cpu_percent": c, "cmd": cmd} for c, cmd in busy[:top] if c > 0]}
