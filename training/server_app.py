"""The ServerApp: run the compressed FedAvg strategy and record every round.

The same ``serve`` runs under every grid: the in-process grid
(training.runner), Flower's simulation engine and a Flower deployment
(SuperLink + SuperNodes). Under ``flwr run`` the config comes from the run
config key ``config`` (a path to a TOML file) plus ``overrides``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from . import loop
from .config import RunConfig, load_config
from .recorder import append_jsonl, prepare_run_dir, read_metrics, round_record, write_atomic
from .strategy import CompressedFedAvg, RoundStats
from .task import config_record, dataset, pack, test_data

log = logging.getLogger("fedfinn.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run`` (a Flower deployment; see training.deploy).

    Run config keys (pyproject.toml ``[tool.flwr.app.config]``): ``config``, the
    TOML file (a path on the SuperLink host; "" = defaults only), ``overrides``
    (";"-separated ``section.key=value``) and ``resume`` (continue the run in
    its folder from the last checkpoint).
    """
    rc = context.run_config
    path = str(rc.get("config", "")) or None
    overrides = [s for s in str(rc.get("overrides", "")).split(";") if s]
    resume = bool(rc.get("resume", False))
    cfg = load_config(path, overrides)
    if not log.handlers and not logging.getLogger("fedfinn").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fedfinn").addHandler(handler)
        logging.getLogger("fedfinn").setLevel(logging.INFO)
    prepare_run_dir(cfg, resume=resume)
    log.info("run folder %s (%s)", cfg.run_dir.resolve(), "resumed" if resume else "new")
    serve(PollingGrid(grid), cfg, progress=False, resume=resume)


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


def serve(grid: Grid, cfg: RunConfig, progress: bool = True, resume: bool = False) -> Path:
    """Run every round of ``cfg`` over ``grid``; ``resume`` continues a stopped run."""
    run_dir = cfg.run_dir
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    x_test, y_test = test_data(cfg)
    d = dataset(cfg)
    started = time.perf_counter()

    def evaluate(model):
        return loop.evaluate(model, x_test, y_test, batch_size=cfg.run.eval_batch_size, mean=d.mean, std=d.std)

    def on_round_end(stats: RoundStats, acc: float, loss: float) -> None:
        # checkpoint first: a metrics line is only ever written for a round whose model is on disk
        last = stats.round == cfg.federation.rounds
        if last or stats.round % cfg.run.checkpoint_every == 0:
            write_atomic(checkpoint_path(run_dir, stats.round), strategy.last_down)
        record = round_record(stats, acc, loss)
        if cfg.run.export_every and (last or stats.round % cfg.run.export_every == 0):
            record["export"] = export_global_model(cfg, run_dir, stats.round, strategy.last_down)
        hw = cfg.hardware
        if hw.boards and (last or stats.round % hw.every == 0):
            record.update(measure_on_boards(cfg, stats.round, strategy.last_down, x_test, y_test, acc))
        append_jsonl(run_dir / "metrics.jsonl", record)
        bar.update(1)
        bar.set_postfix(acc=f"{acc:.3f}", up=f"{record['mib_up_mean'] or 0:.3f}MiB", down=f"{record['mib_down']:.3f}MiB")

    strategy = CompressedFedAvg(cfg, on_round_end=on_round_end)
    done, arrays = resume_point(strategy, run_dir) if resume else (0, strategy.initial_arrays())
    bar = tqdm(total=cfg.federation.rounds, initial=done, desc=cfg.run.name, unit="round", disable=not progress)
    evaluate_fn = strategy.evaluate_fn(evaluate)
    try:
        for server_round in range(done + 1, cfg.federation.rounds + 1):
            arrays = run_round(strategy, grid, server_round, arrays, cfg)
            evaluate_fn(server_round, arrays)
    finally:
        bar.close()
    summary = {"run": cfg.run.name, "rounds": cfg.federation.rounds, "seconds": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir


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
            reply.metadata.__dict__["_src_node_id"] = dst
    if strategy.current is None:
        return
    wait = f"within the {timeout:g} s round timeout" if timeout else "before the round ended"
    for node in sent.values():
        log.warning("round %d: no reply from node %s %s", strategy.current.round, node, wait)
        strategy.current.rejected.append({"node": int(node), "reason": f"no reply {wait} (node lost or too slow)"})


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round_{server_round:03d}.ffnc"


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


def export_global_model(cfg: RunConfig, run_dir: Path, server_round: int, blob: bytes) -> dict:
    """QONNX (+ FINN-ONNX for deployable models) of the round's global model; never fails the run."""
    try:
        from export import export_round

        from .compress import message_to_model
        from .task import make_model

        model = make_model(cfg)
        message_to_model(model, blob)
        return export_round(model, run_dir, server_round, model_name=cfg.model.name).summary()
    except Exception as err:  # an export problem is logged beside the round, training goes on
        log.warning("round %d: export failed: %s", server_round, err)
        return {"error": f"{type(err).__name__}: {err}"}


def measure_on_boards(cfg: RunConfig, server_round: int, blob: bytes, x_test, y_test, acc: float) -> dict:
    """The round's global model on every board of ``[hardware]``: weights sent, test images evaluated.

    Returns the round record's ``boards`` (one entry per board, client_pynq.host's
    fields) and ``boards_host_accuracy`` (the PyTorch model's accuracy on the same
    images, the figure a bit-exact board must reproduce). A board that is
    unreachable or fails is logged and its entry says why; training goes on.
    """
    from client_pynq.host import measure_round

    from .compress import message_to_model
    from .task import make_model

    hw = cfg.hardware
    n = hw.images or len(y_test)
    images, labels = x_test[:n], y_test[:n]
    t0 = time.perf_counter()
    try:
        model = make_model(cfg)
        message_to_model(model, blob)
        token = Path(hw.token_file).read_text().strip() if hw.token_file else None
    except Exception as err:  # a missing token file or a model that will not load: logged, training goes on
        log.warning("round %d: boards not measured: %s", server_round, err)
        return {"boards": [{"board": b, "ok": False, "round": server_round, "stage": "prepare",
                            "error": f"{type(err).__name__}: {err}"} for b in hw.boards]}
    entries = measure_round(hw.boards, model, images=images, labels=labels, build=hw.build or None,
                            round=server_round, token=token, batch_size=hw.batch_size or None, timeout=hw.timeout)
    for e in entries:
        if not e.get("ok"):
            log.warning("round %d: board %s failed at %s: %s", server_round, e.get("board"), e.get("stage"),
                        e.get("error"))
    host = acc if n == len(y_test) else _host_accuracy(cfg, model, images, labels)
    return {"boards": entries, "boards_host_accuracy": host,
            "seconds_boards": round(time.perf_counter() - t0, 3)}


def _host_accuracy(cfg: RunConfig, model, images, labels) -> float:
    d = dataset(cfg)
    _, acc = loop.evaluate(model, images, labels, batch_size=cfg.run.eval_batch_size, mean=d.mean, std=d.std)
    return acc
