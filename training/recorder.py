"""A run's folder: ``runs/<name>/``.

* ``config.toml``: the resolved config the run used;
* ``metrics.jsonl``: one JSON line per round, appended and flushed as soon as
  the round ends (a crash loses nothing that finished);
* ``checkpoints/round_NNN.ffnc``: the global model as sent to the clients
  (codec bytes, see training.codec), every ``checkpoint_every`` rounds and at
  the last round;
* ``summary.json`` and ``accuracy.png`` when the run ends.

:func:`load_run` reads a finished (or stopped) run folder back: every report,
the study and the export read runs through it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .codec import mib
from .config import RunConfig, from_dict


class RunExistsError(RuntimeError):
    pass


def prepare_run_dir(cfg: RunConfig, overwrite: bool = False, resume: bool = False) -> Path:
    run_dir = cfg.run_dir
    metrics = run_dir / "metrics.jsonl"
    if resume:
        saved = run_dir / "config.toml"
        if not saved.exists():
            raise RunExistsError(f"nothing to resume: {saved} does not exist")
        if from_dict(tomllib.loads(saved.read_text())) != cfg:  # keys added since default on both sides
            raise RunExistsError(f"cannot resume {run_dir}: its config.toml differs from the config given")
        return run_dir
    if metrics.exists() and metrics.stat().st_size and not overwrite:
        raise RunExistsError(f"{run_dir} already holds a run; pick another run.name or pass --overwrite")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if metrics.exists():
        metrics.unlink()
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def note_session(run_dir: Path, **info) -> None:
    """Append one line to ``sessions.jsonl``: where and with what code this run (re)started computing."""
    line = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {platform.system()} "
                       f"{platform.release()}", "python": platform.python_version(), "commit": source_commit(), **info}
    append_jsonl(Path(run_dir) / "sessions.jsonl", line)


def read_sessions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "sessions.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def source_commit(where: Path | None = None) -> str:
    """The git commit of the code this process runs (or of the checkout at ``where``), with "+changes"
    when tracked code differs from it; "" outside a git checkout."""
    cwd = Path(__file__).resolve().parent if where is None else where
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd,
                             capture_output=True, text=True, timeout=5)
        # only code counts as a change: results (a study's committed run folders) move while it runs
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)results", ":(top,exclude)runs"],
                               cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    if out.returncode:
        return ""
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


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
        "notes": getattr(stats, "notes", []),
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


# ----------------------------------------------------------------------------- checkpoints

_CHECKPOINT = re.compile(r"^round_(\d+)\.ffnc$")


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """``checkpoints/round_NNN.ffnc``: the global model of a round, as sent to the clients (codec bytes)."""
    return Path(run_dir) / "checkpoints" / f"round_{server_round:03d}.ffnc"


def state_path(run_dir: Path, server_round: int) -> Path:
    """``checkpoints/round_NNN.state.npz``: update mode's per-node copies (server) and node states, if any."""
    return Path(run_dir) / "checkpoints" / f"round_{server_round:03d}.state.npz"


def write_state(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray]) -> None:
    """Named uint8 arrays (codec messages) beside the round's checkpoint, written atomically."""
    path = state_path(run_dir, server_round)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def read_state(run_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    """What :func:`write_state` wrote for the round ({} if nothing)."""
    path = state_path(run_dir, server_round)
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def prune_checkpoints(run_dir: Path, keep: int, recorded: int) -> None:
    """Keep the newest ``keep`` checkpoints among the recorded rounds (0 = keep all); newer, not yet
    recorded ones stay too, so a run can always resume from a round that has its JSON line."""
    if keep <= 0:
        return
    rounds = [r for r in checkpoint_rounds(run_dir) if r <= recorded]
    for r in rounds[:-keep]:
        checkpoint_path(run_dir, r).unlink(missing_ok=True)
        state_path(run_dir, r).unlink(missing_ok=True)


def drop_spare_state(run_dir: Path, planned_rounds: int) -> list[Path]:
    """Remove update-mode state a run no longer needs; returns what was removed.

    A resume reads the state of the last recorded round only, so older ones are spare; a run that
    recorded all ``planned_rounds`` needs none (extended later, its nodes start over from the
    initial model, as after any lost state). A study that commits its run folders uses this: each
    state is ~10 copies of the model."""
    rows = read_metrics(run_dir)
    recorded = rows[-1]["round"] if rows else 0
    removed = []
    for r in checkpoint_rounds(run_dir):
        path = state_path(run_dir, r)
        if path.exists() and (r < recorded or recorded >= planned_rounds):
            path.unlink()
            removed.append(path)
    return removed


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds that have a checkpoint in ``run_dir``, ascending."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)))


# ----------------------------------------------------------------------------- reading a run back


@dataclass
class RunRecord:
    """A run folder read back: its config (as parsed from ``config.toml``) and its JSON lines."""

    path: Path
    cfg: dict
    rows: list[dict] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rounds(self) -> int:
        return self.rows[-1]["round"]

    @property
    def planned_rounds(self) -> int:
        return int(self.cfg.get("federation", {}).get("rounds", self.rounds))

    @property
    def finished(self) -> bool:
        """Every round of the config is recorded (a run stopped part-way is not)."""
        return self.rounds >= self.planned_rounds

    def accuracy_last3_at(self, round_: int) -> float:
        """Mean test accuracy of the three rounds up to ``round_`` (a finished run compared with one still
        running, at the same point)."""
        last = [r for r in self.rows if r["round"] <= round_][-3:]
        return sum(r["test_accuracy"] for r in last) / len(last)

    @property
    def accuracy(self) -> float:
        """Test accuracy after the last round."""
        return self.rows[-1]["test_accuracy"]

    @property
    def best_accuracy(self) -> float:
        return max(r["test_accuracy"] for r in self.rows)

    @property
    def accuracy_last3(self) -> float:
        """Mean test accuracy of the last three rounds (less noisy than the last one)."""
        last = self.rows[-3:]
        return sum(r["test_accuracy"] for r in last) / len(last)

    @property
    def mib_up(self) -> float:
        """Mean uplink message per client, over all rounds."""
        ups = [b for r in self.rows for b in r["bytes_up"]]
        return mib(sum(ups) / len(ups)) if ups else math.nan

    @property
    def mib_down(self) -> float:
        """Mean downlink message per sampled node, over all rounds."""
        return mib(sum(r["bytes_down"] for r in self.rows) / len(self.rows))

    @property
    def mib_max(self) -> float:
        """The largest single message of the run, either direction (update mode: messages vary by node)."""
        ups = [b for r in self.rows for b in r["bytes_up"]]
        downs = [b for r in self.rows for b in (r.get("bytes_down_each") or [r["bytes_down"]])]
        return mib(max(ups + downs))

    @property
    def seconds_per_round(self) -> float:
        return sum(r["seconds"].get("round", 0) for r in self.rows) / len(self.rows)

    @property
    def compression(self) -> dict:
        return self.cfg.get("compression", {})

    @property
    def delta(self) -> bool:
        return self.compression.get("update") == "delta"

    @property
    def prune_rate(self) -> float:
        return float(self.compression.get("prune_rate", 0.0))

    @property
    def bits(self) -> int:
        return int(self.compression.get("weight_bits", 32))

    @property
    def quantized(self) -> bool:
        return self.bits != 32 or bool(self.compression.get("client_bits"))


def run_config_path(run_dir: str | Path) -> Path:
    """``run_dir/config.toml``; FileNotFoundError when ``run_dir`` is not a run folder."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.toml)")
    return path


def load_run(run_dir: str | Path) -> RunRecord:
    """Read ``run_dir`` back; raises if it is not a run folder or has no finished round."""
    run_dir = Path(run_dir)
    cfg_path = run_config_path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no finished round (metrics.jsonl is empty)")
    return RunRecord(run_dir, tomllib.loads(cfg_path.read_text()), rows)
