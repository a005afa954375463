"""The server loop: train, aggregate, evaluate, checkpoint, observers, record.

``serve(grid, cfg, observers=...)`` runs every round of a config over any
Flower grid: the in-process grid (training.runner), Flower's simulation
engine, or a Flower deployment (SuperLink + SuperNodes; the deployment's
ServerApp is fedfinn.server_app, which adds the export and board observers).

One round, in this order:

1. **train**: the strategy samples the clients and sends each the downlink
   message; the grid brings back their replies (training.strategy);
2. **aggregate**: bad replies are rejected and logged, the rest averaged into
   the new global model, which is compressed for the next downlink;
3. **evaluate**: that downlink model (what the clients will receive) on the
   run's test images;
4. **checkpoint**: the downlink message, byte for byte
   (``checkpoints/round_NNN.ffnc``), before anything else is written about
   the round;
5. **observers**: each callable in ``observers`` gets a :class:`RoundEnd` and
   returns fields for the round's JSON line (exports, board measurements);
   the loop knows nothing else about them;
6. **record**: one JSON line in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from . import loop
from .compress import message_to_model
from .config import RunConfig
from .flower_compat import set_message_ids
from .pruning import sparsity
from .recorder import append_jsonl, checkpoint_path, read_metrics, round_record, write_atomic
from .strategy import CompressedFedAvg, RoundStats
from .task import config_record, dataset, make_model, pack, test_data

log = logging.getLogger("fedfinn.server")


@dataclass
class RoundEnd:
    """What the server knows when a round ends: what every round observer is handed."""

    cfg: RunConfig
    server_round: int
    blob: bytes  # the global model exactly as sent to the clients (codec bytes)
    accuracy: float
    loss: float
    _model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def last(self) -> bool:
        return self.server_round == self.cfg.federation.rounds

    def every(self, k: int) -> bool:
        """Is this round one of every ``k`` (or the last)?"""
        return self.last or (k > 0 and self.server_round % k == 0)

    def model(self) -> torch.nn.Module:
        """The global model decoded from ``blob`` (decoded once, shared by the observers)."""
        if self._model is None:
            self._model = make_model(self.cfg)
            message_to_model(self._model, self.blob)
            self._model.eval()
        return self._model


#: Called at the end of every round; returns fields for the round's JSON line (or an empty dict).
RoundObserver = Callable[[RoundEnd], dict]


class PollingGrid(Grid):
    """A deployment grid whose ``send_and_receive`` polls for replies every ``interval`` s.

    Flower 1.42's HTTP grid sleeps a fixed 3 s between two pulls of replies,
    which adds up to 3 s to every round; this wrapper pushes through the same
    grid and pulls every ``interval`` seconds (env FEDFINN_GRID_POLL, default
    0.1 s). Everything else is the wrapped grid's.
    """

    def __init__(self, inner: Grid, interval: float | None = None):
        self.inner = inner
        self.interval = interval if interval is not None else float(os.environ.get("FEDFINN_GRID_POLL", "0.1"))

    @property
    def run(self):
        return self.inner.run

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    def create_message(self, *args, **kwargs):
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        t0 = time.monotonic()
        pending = {i for i in self.push_messages(messages) if i}
        sent = len(pending)
        deadline = None if timeout is None else t0 + timeout
        replies: list = []
        arrivals: list[float] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            arrivals += [time.monotonic() - t0] * len(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.interval if left is None else min(self.interval, left))
        log.info("%d/%d replies, after %s s", len(replies), sent, ", ".join(f"{a:.2f}" for a in arrivals) or "-")
        return replies


def serve(grid: Grid, cfg: RunConfig, *, observers: Iterable[RoundObserver] = (), progress: bool = True,
          resume: bool = False) -> Path:
    """Run every round of ``cfg`` over ``grid``; ``resume`` continues a stopped run from its last checkpoint."""
    run_dir = cfg.run_dir
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    observers = list(observers)
    started = time.perf_counter()
    strategy = CompressedFedAvg(cfg)
    done, arrays = resume_point(strategy, run_dir) if resume else (0, strategy.initial_arrays())
    with tqdm(total=cfg.federation.rounds, initial=done, desc=cfg.run.name, unit="round",
              disable=not progress) as bar:
        for server_round in range(done + 1, cfg.federation.rounds + 1):
            arrays = run_round(strategy, grid, server_round, arrays, cfg)
            stats = strategy.current
            accuracy, loss = evaluate_global(cfg, strategy.last_down, stats)
            end = RoundEnd(cfg, server_round, strategy.last_down, accuracy, loss)
            if end.every(cfg.run.checkpoint_every):
                write_atomic(checkpoint_path(run_dir, server_round), strategy.last_down)
            record = round_record(stats, accuracy, loss)
            for observe in observers:
                record.update(observe(end))
            append_jsonl(run_dir / "metrics.jsonl", record)
            bar.update(1)
            bar.set_postfix(acc=f"{accuracy:.3f}", up=f"{record['mib_up_mean'] or 0:.3f}MiB",
                            down=f"{record['mib_down']:.3f}MiB")
    summary = {"run": cfg.run.name, "rounds": cfg.federation.rounds, "seconds": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir


def evaluate_global(cfg: RunConfig, blob: bytes, stats: RoundStats) -> tuple[float, float]:
    """(accuracy, loss) of the downlink model on the run's test images; times and sparsity into ``stats``."""
    t0 = time.perf_counter()
    model = make_model(cfg)
    message_to_model(model, blob)
    x_test, y_test = test_data(cfg)
    d = dataset(cfg)
    loss, accuracy = loop.evaluate(model, x_test, y_test, batch_size=cfg.run.eval_batch_size, mean=d.mean, std=d.std)
    stats.times["evaluate"] = time.perf_counter() - t0
    stats.times["round"] = time.perf_counter() - stats.started
    stats.sparsity = sparsity(model)
    return accuracy, loss


def run_round(strategy: CompressedFedAvg, grid: Grid, server_round: int, arrays: ArrayRecord, cfg: RunConfig) -> ArrayRecord:
    """One round of Flower's Strategy loop (what ``Strategy.start`` does per round).

    Written out so that a run can resume at any round and so that the reply
    timeout of the run config applies; the strategy hooks are FedAvg's.
    """
    messages = list(strategy.configure_train(server_round, arrays, config_record(cfg), grid))
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout or None))
    note_missing(strategy, messages, replies, cfg.federation.round_timeout)
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays if new_arrays is None else new_arrays


def note_missing(strategy: CompressedFedAvg, messages: list, replies: list, timeout: float) -> None:
    """Record the sampled clients whose reply never came (a node lost mid-round, or too slow).

    Each becomes a ``rejected`` entry of the round (its node id and the reason).
    An error reply made by the SuperLink for a lost node (Flower's "Node
    Unavailable") is attributed to the node the message was sent to, so the
    round's JSON line names the missing client either way.
    """
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    for reply in replies:
        dst = sent.pop(reply.metadata.reply_to_message_id, None)
        if dst is not None and reply.metadata.src_node_id != dst:
            set_message_ids(reply, src_node_id=dst)
    if strategy.current is None:
        return
    wait = f"within the {timeout:g} s round timeout" if timeout else "before the round ended"
    for node in sent.values():
        log.warning("round %d: no reply from node %s %s", strategy.current.round, node, wait)
        strategy.current.rejected.append({"node": int(node), "reason": f"no reply {wait} (node lost or too slow)"})


def resume_point(strategy: CompressedFedAvg, run_dir: Path) -> tuple[int, ArrayRecord]:
    """The last round with both a metrics line and a checkpoint, and its global model.

    Metrics lines after that round (possible with ``checkpoint_every`` > 1)
    are dropped, so every round appears exactly once when the run ends.
    """
    rows = read_metrics(run_dir)
    done = 0
    for row in reversed(rows):
        if checkpoint_path(run_dir, row["round"]).exists():
            done = row["round"]
            break
    if done == 0:
        return 0, strategy.initial_arrays()
    kept = [r for r in rows if r["round"] <= done]
    if len(kept) != len(rows):
        log.warning("resume: dropping %d round(s) after the last checkpoint (round %d)", len(rows) - len(kept), done)
        write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
    blob = checkpoint_path(run_dir, done).read_bytes()
    strategy.restore(blob, done)
    log.info("resuming after round %d", done)
    return done, pack(blob)
