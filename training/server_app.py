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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from . import loop
from .compress import decode_for, load_values, message_to_model
from .config import RunConfig
from .flower_compat import set_message_ids
from .pruning import sparsity
from .recorder import (
    append_jsonl, checkpoint_path, note_session, prune_checkpoints, read_metrics, read_state, round_record, write_atomic,
    write_state,
)
from .strategy import CompressedFedAvg, RoundStats
from .task import config_record, dataset, device_of, make_model, pack, prepare_model, test_data_on

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


class GlobalEvaluation:
    """The downlink model of every round on the run's test images: one model, on the run's device.

    With ``run.overlap_eval`` the evaluation runs in one worker thread, so round r's model is
    evaluated while round r+1 trains (the next round does not depend on it); ``threads`` bounds
    torch's threads in this process meanwhile (training workers on the same cores keep theirs).
    """

    def __init__(self, cfg: RunConfig, threads: int | None = None):
        self.cfg = cfg
        if threads:
            torch.set_num_threads(threads)
        self.device = device_of(cfg)
        self.model = prepare_model(make_model(cfg), cfg, self.device)  # built once, here: make_model seeds torch
        self.x, self.y = test_data_on(cfg, self.device)
        self.stats = dataset(cfg)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="evaluate") if cfg.run.overlap_eval else None

    def __call__(self, blob: bytes) -> dict:
        t0 = time.perf_counter()
        load_values(self.model, decode_for(self.model, blob))
        c = self.cfg
        loss, accuracy = loop.evaluate(self.model, self.x, self.y, batch_size=c.run.eval_batch_size,
                                       mean=self.stats.mean, std=self.stats.std,
                                       channels_last=c.train.channels_last, bf16=c.train.bf16)
        return {"accuracy": accuracy, "loss": loss, "sparsity": sparsity(self.model),
                "seconds": time.perf_counter() - t0}

    @property
    def overlapped(self) -> bool:
        return self.pool is not None

    def submit(self, blob: bytes) -> Future:
        if self.pool is not None:
            return self.pool.submit(self, blob)
        done: Future = Future()
        done.set_result(self(blob))
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class _Pending:
    """A round whose global model is saved and being evaluated; its JSON line is still to be written."""

    stats: RoundStats
    blob: bytes
    evaluation: Future


def serve(grid: Grid, cfg: RunConfig, *, observers: Iterable[RoundObserver] = (), progress: bool = True,
          resume: bool = False, eval_threads: int | None = None) -> Path:
    """Run every round of ``cfg`` over ``grid``; ``resume`` continues a stopped run from its last checkpoint.

    Round r: train + aggregate (run_round), checkpoint (and the update-mode state), evaluation started;
    the round is recorded (observers, JSON line) once its evaluation is done, which with
    ``run.overlap_eval`` is while round r+1 trains.
    """
    run_dir = cfg.run_dir
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    observers = list(observers)
    started = time.perf_counter()
    strategy = CompressedFedAvg(cfg)
    done, arrays = resume_point(strategy, run_dir, grid) if resume else (0, strategy.initial_arrays())
    evaluation = GlobalEvaluation(cfg, eval_threads)
    note_session(run_dir, from_round=done, device=str(evaluation.device), torch=torch.__version__,
                 backend=cfg.federation.backend, torch_threads=torch.get_num_threads())
    pending: _Pending | None = None
    with tqdm(total=cfg.federation.rounds, initial=done, desc=cfg.run.name, unit="round",
              disable=not progress) as bar:
        def record(p: _Pending, next_start: float) -> None:
            result = p.evaluation.result()
            p.stats.times["evaluate"] = result["seconds"]
            p.stats.times["round"] = next_start - p.stats.started  # this round's share of the run's wall time
            p.stats.sparsity = result["sparsity"]
            end = RoundEnd(cfg, p.stats.round, p.blob, result["accuracy"], result["loss"])
            line = round_record(p.stats, end.accuracy, end.loss)
            for observe in observers:
                line.update(observe(end))
            append_jsonl(run_dir / "metrics.jsonl", line)
            prune_checkpoints(run_dir, cfg.run.keep_checkpoints, recorded=p.stats.round)
            bar.update(1)
            bar.set_postfix(acc=f"{end.accuracy:.3f}", up=f"{line['mib_up_mean'] or 0:.3f}MiB",
                            down=f"{line['mib_down']:.3f}MiB")

        try:
            for server_round in range(done + 1, cfg.federation.rounds + 1):
                arrays = run_round(strategy, grid, server_round, arrays, cfg)
                stats = strategy.current
                if server_round == cfg.federation.rounds or server_round % cfg.run.checkpoint_every == 0:
                    save_round(run_dir, server_round, strategy, grid)
                if pending is not None:
                    finished, pending = pending, None
                    record(finished, stats.started)
                pending = _Pending(stats, strategy.last_down, evaluation.submit(strategy.last_down))
                if not evaluation.overlapped:  # evaluated already: the round's line is written now
                    finished, pending = pending, None
                    record(finished, time.perf_counter())
        finally:
            try:  # the last round, or the round finished before an interruption: its line is not lost
                if pending is not None:
                    record(pending, time.perf_counter())
            finally:
                evaluation.close()
    summary = {"run": cfg.run.name, "rounds": cfg.federation.rounds, "seconds": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir


def save_round(run_dir: Path, server_round: int, strategy: CompressedFedAvg, grid: Grid) -> None:
    """The round's checkpoint (the downlink message, byte for byte) and, in update mode, the state a
    bit-exact resume needs: the server's copy of each node's model and each node's own state where the
    grid can hand it over (the in-process grids)."""
    write_atomic(checkpoint_path(run_dir, server_round), strategy.last_down)
    state = strategy.state_arrays()
    if state and hasattr(grid, "node_states"):
        state.update(grid.node_states())
    if state:
        write_state(run_dir, server_round, state)


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


def resume_point(strategy: CompressedFedAvg, run_dir: Path, grid: Grid) -> tuple[int, ArrayRecord]:
    """The last round with both a metrics line and a checkpoint, and its global model.

    Metrics lines after that round (possible with ``checkpoint_every`` > 1)
    are dropped, so every round appears exactly once when the run ends. The
    update-mode state saved with that checkpoint goes back into the strategy
    and, where the grid takes it, into the nodes; what cannot be restored is
    logged (those nodes start over from the initial model, by fingerprint).
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
    state = read_state(run_dir, done)
    strategy.restore(blob, done, state)
    if strategy.delta:
        if state and hasattr(grid, "restore_node_states"):
            grid.restore_node_states(state)
        else:
            log.warning("resume: the nodes' own update-mode state is not restored here (%s): a node whose copy "
                        "differs from the server's starts over from the initial model",
                        "no state saved" if not state else "this grid keeps no node state")
    log.info("resuming after round %d", done)
    return done, pack(blob)
