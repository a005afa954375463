"""The ServerApp: run the compressed FedAvg strategy and record every round.

The same ``serve`` runs under every grid: the in-process grid
(training.runner), Flower's simulation engine and a Flower deployment
(SuperLink + SuperNodes). Under ``flwr run`` the config comes from the run
config key ``config`` (a path to a TOML file) plus ``overrides``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from . import loop
from .config import RunConfig, load_config
from .recorder import append_jsonl, read_metrics, round_record, write_atomic
from .strategy import CompressedFedAvg, RoundStats
from .task import config_record, dataset, pack, test_data

log = logging.getLogger("fedfinn.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get("config")
    overrides = [s for s in str(context.run_config.get("overrides", "")).split(";") if s]
    serve(grid, load_config(path, overrides))


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
    messages = strategy.configure_train(server_round, arrays, config_record(cfg), grid)
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout or None)
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays if new_arrays is None else new_arrays


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
