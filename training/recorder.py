"""A run's folder: ``runs/<name>/``.

* ``config.toml``: the resolved config the run used;
* ``metrics.jsonl``: one JSON line per round, appended and flushed as soon as
  the round ends (a crash loses nothing that finished);
* ``checkpoints/round_NNN.ffnc``: the global model as sent to the clients
  (codec bytes, see training.codec), every ``checkpoint_every`` rounds and at
  the last round;
* ``summary.json`` and ``accuracy.png`` when the run ends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .codec import mib
from .config import RunConfig


class RunExistsError(RuntimeError):
    pass


def prepare_run_dir(cfg: RunConfig, overwrite: bool = False, resume: bool = False) -> Path:
    run_dir = cfg.run_dir
    metrics = run_dir / "metrics.jsonl"
    if resume:
        saved = run_dir / "config.toml"
        if not saved.exists():
            raise RunExistsError(f"nothing to resume: {saved} does not exist")
        if saved.read_text() != cfg.to_toml():
            raise RunExistsError(f"cannot resume {run_dir}: its config.toml differs from the config given")
        return run_dir
    if metrics.exists() and metrics.stat().st_size and not overwrite:
        raise RunExistsError(f"{run_dir} already holds a run; pick another run.name or pass --overwrite")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if metrics.exists():
        metrics.unlink()
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def _clean(x):
    """JSON has no NaN: write null instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def round_record(stats, accuracy: float, loss: float) -> dict:
    up = stats.bytes_up
    return _clean({
        "round": stats.round,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "train_loss": stats.train_loss,
        "train_accuracy": stats.train_accuracy,
        "clients": stats.clients,
        "sampled_nodes": stats.sampled,
        "rejected": stats.rejected,
        "bytes_up": up,
        "bits_up": getattr(stats, "bits_up", []),
        "bytes_down": stats.bytes_down,
        "bytes_down_each": getattr(stats, "bytes_down_each", []),
        "mib_up_mean": mib(sum(up) / len(up)) if up else None,
        "mib_down": mib(stats.bytes_down),
        "sparsity": stats.sparsity,
        "seconds": {k: round(v, 4) for k, v in stats.times.items()},
    })


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
