"""The ServerApp of a Flower deployment (``flwr run``): the server loop with the run's observers.

pyproject.toml names this ``app`` as the deployment's ServerApp. The config
comes from the run config key ``config`` (a path to a TOML file on the
SuperLink host) plus ``overrides``; training.deploy starts the SuperLink, the
SuperNodes and the run.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from training.config import load_config
from training.recorder import prepare_run_dir
from training.server_app import PollingGrid, serve

from .rounds import observers_for

log = logging.getLogger("fedfinn.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run config keys (pyproject.toml ``[tool.flwr.app.config]``): ``config``, the TOML file
    ("" = defaults only), ``overrides`` (";"-separated ``section.key=value``) and ``resume``
    (continue the run in its folder from the last checkpoint)."""
    rc = context.run_config
    path = str(rc.get("config", "")) or None
    overrides = [s for s in str(rc.get("overrides", "")).split(";") if s]
    resume = bool(rc.get("resume", False))
    cfg = load_config(path, overrides)
    fedfinn_log = logging.getLogger("fedfinn")
    if not fedfinn_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fedfinn_log.addHandler(handler)
        fedfinn_log.setLevel(logging.INFO)
    prepare_run_dir(cfg, resume=resume)
    log.info("run folder %s (%s)", cfg.run_dir.resolve(), "resumed" if resume else "new")
    serve(PollingGrid(grid), cfg, observers=observers_for(cfg), progress=False, resume=resume)
