"""What happens to each round's global model beyond training: the round observers.

The server loop (training.server_app.serve) calls every observer it is given
with a :class:`~training.server_app.RoundEnd` and merges what it returns into
the round's JSON line. The observers a run gets follow its config:

* ``run.export_every = k``: :func:`export_observer`, the global model as
  QONNX (and FINN-ONNX for deployable models) every k rounds and at the end;
* ``[hardware] boards``: :func:`boards_observer`, the global model measured on
  every board agent (runtime weights sent, test images evaluated).

Neither ever stops training: a failure is logged and recorded in the round's
line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from export.run_export import export_round
from training import loop
from training.config import RunConfig
from training.server_app import RoundEnd, RoundObserver
from training.task import dataset, test_data

from .boards import measure_round

log = logging.getLogger("fedfinn.server")


def observers_for(cfg: RunConfig) -> list[RoundObserver]:
    """The observers the config asks for, in the order they run."""
    observers: list[RoundObserver] = []
    if cfg.run.export_every:
        observers.append(export_observer)
    if cfg.hardware.boards:
        observers.append(boards_observer)
    return observers


def export_observer(end: RoundEnd) -> dict:
    """QONNX (+ FINN-ONNX for deployable models) of the round's global model every ``run.export_every`` rounds."""
    if not end.every(end.cfg.run.export_every):
        return {}
    try:
        result = export_round(end.model(), end.cfg.run_dir, end.server_round, model_name=end.cfg.model.name)
        return {"export": result.summary()}
    except Exception as err:  # an export problem is logged beside the round, training goes on
        log.warning("round %d: export failed: %s", end.server_round, err)
        return {"export": {"error": f"{type(err).__name__}: {err}"}}


def boards_observer(end: RoundEnd) -> dict:
    """The round's global model on every board of ``[hardware]``: weights sent, test images evaluated.

    Returns the round record's ``boards`` (one entry per board, fedfinn.boards'
    fields) and ``boards_host_accuracy`` (the PyTorch model's accuracy on the same
    images, the figure a bit-exact board must reproduce). A board that is
    unreachable or fails is logged and its entry says why.
    """
    hw = end.cfg.hardware
    if not end.every(hw.every):
        return {}
    x_test, y_test = test_data(end.cfg)
    n = hw.images or len(y_test)
    images, labels = x_test[:n], y_test[:n]
    t0 = time.perf_counter()
    try:
        model = end.model()
        token = Path(hw.token_file).read_text().strip() if hw.token_file else None
    except Exception as err:  # a missing token file or a model that will not load: logged, training goes on
        log.warning("round %d: boards not measured: %s", end.server_round, err)
        return {"boards": [{"board": b, "ok": False, "round": end.server_round, "stage": "prepare",
                            "error": f"{type(err).__name__}: {err}"} for b in hw.boards]}
    entries = measure_round(hw.boards, model, images=images, labels=labels, build=hw.build or None,
                            server_round=end.server_round, token=token, batch_size=hw.batch_size or None,
                            timeout=hw.timeout)
    for e in entries:
        if not e.get("ok"):
            log.warning("round %d: board %s failed at %s: %s", end.server_round, e.get("board"), e.get("stage"),
                        e.get("error"))
    host = end.accuracy if n == len(y_test) else host_accuracy(end.cfg, model, images, labels)
    return {"boards": entries, "boards_host_accuracy": host,
            "seconds_boards": round(time.perf_counter() - t0, 3)}


def host_accuracy(cfg: RunConfig, model, images, labels) -> float:
    """The PyTorch model's accuracy on the images the boards got."""
    d = dataset(cfg)
    _, acc = loop.evaluate(model, images, labels, batch_size=cfg.run.eval_batch_size, mean=d.mean, std=d.std)
    return acc
