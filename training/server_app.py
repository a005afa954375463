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

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from . import loop
from .config import RunConfig, load_config
from .recorder import append_jsonl, round_record, write_atomic
from .strategy import CompressedFedAvg, RoundStats
from .task import config_record, dataset, test_data

log = logging.getLogger("fedfinn.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get("config")
    overrides = [s for s in str(context.run_config.get("overrides", "")).split(";") if s]
    serve(grid, load_config(path, overrides))


def serve(grid: Grid, cfg: RunConfig, progress: bool = True) -> Path:
    run_dir = cfg.run_dir
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    x_test, y_test = test_data(cfg)
    d = dataset(cfg)
    bar = tqdm(total=cfg.federation.rounds, desc=cfg.run.name, unit="round", disable=not progress)
    started = time.perf_counter()

    def evaluate(model):
        return loop.evaluate(model, x_test, y_test, batch_size=cfg.run.eval_batch_size, mean=d.mean, std=d.std)

    def on_round_end(stats: RoundStats, acc: float, loss: float) -> None:
        last = stats.round == cfg.federation.rounds
        if last or stats.round % cfg.run.checkpoint_every == 0:
            write_atomic(run_dir / "checkpoints" / f"round_{stats.round:03d}.ffnc", strategy.last_down)
        record = round_record(stats, acc, loss)
        append_jsonl(run_dir / "metrics.jsonl", record)
        bar.update(1)
        bar.set_postfix(acc=f"{acc:.3f}", up=f"{record['mib_up_mean'] or 0:.3f}MiB", down=f"{record['mib_down']:.3f}MiB")

    strategy = CompressedFedAvg(cfg, on_round_end=on_round_end)
    try:
        strategy.start(
            grid,
            initial_arrays=strategy.initial_arrays(),
            num_rounds=cfg.federation.rounds,
            train_config=config_record(cfg),
            evaluate_fn=strategy.evaluate_fn(evaluate),
        )
    finally:
        bar.close()
    summary = {"run": cfg.run.name, "rounds": cfg.federation.rounds, "seconds": time.perf_counter() - started}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir
