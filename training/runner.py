"""Run a config end to end, in one of two ways that need no servers.

* ``inprocess``: a Flower ``Grid`` implemented here that hands each message
  straight to the ClientApp in this process, clients one after another. No
  Ray, so it starts in about a second: tests and the README's quick job.
* ``ray``: Flower's simulation engine, clients trained in parallel (one
  thread each by default): the way for long runs on one machine.

Both run the same ServerApp code (training.server_app.serve) and the same
ClientApp (training.client_app.app).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from .client_app import app as client_app
from .config import RunConfig
from .flower_compat import set_message_ids, stamp_server_task_identity
from .recorder import prepare_run_dir
from .server_app import RoundObserver, serve
from .task import dataset

log = logging.getLogger("fedfinn")


def call_client(client_app, msg: Message, context: Context) -> Message:
    """Run the ClientApp on one message; a failure becomes an error reply, as from a SuperNode."""
    try:
        return client_app(msg, context)
    except Exception as err:
        log.debug("client %s failed:\n%s", msg.metadata.dst_node_id, traceback.format_exc())
        return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


_WORKER_APP = None


def _worker_init(client_app, threads: int) -> None:
    global _WORKER_APP
    _WORKER_APP = client_app
    torch.set_num_threads(threads)


def _worker_call(msg: Message, context: Context) -> tuple[Message, Context]:
    # the context comes back too: what the ClientApp kept in context.state must persist, as on a SuperNode
    return call_client(_WORKER_APP, msg, context), context


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls on this machine, without servers.

    ``workers <= 1``: each message is handled right away in this process,
    clients one after another. ``workers > 1``: messages go to a pool of
    forked worker processes (one single-thread torch per worker by default)
    that inherit the loaded data set, so clients train in parallel at no
    start-up cost. Either way a ClientApp that raises produces an error
    reply, as a SuperNode would, so the strategy sees the same thing in
    every runtime.
    """

    def __init__(self, client_app, num_nodes: int, node_config: dict | None = None,
                 workers: int = 0, threads_per_worker: int = 1):
        self.client_app = client_app
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id,
                             node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                             state=RecordDict(), run_config={})
            for i, node_id in enumerate(range(1001, 1001 + num_nodes))
        }
        self.replies: dict[str, Message] = {}
        self.pending: dict[str, object] = {}  # message id -> AsyncResult (worker pool)
        self._run = None
        # Fork before this process runs any torch op: forked OpenMP pools can hang.
        self.pool = None
        if workers > 1:
            self.pool = mp.get_context("fork").Pool(workers, _worker_init, (client_app, threads_per_worker))
        stamp_server_task_identity()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            set_message_ids(msg, message_id=str(uuid4()), src_node_id=0)
            context = self.contexts[msg.metadata.dst_node_id]
            if self.pool is not None:
                self.pending[msg.metadata.message_id] = self.pool.apply_async(_worker_call, (msg, context))
            else:
                self.replies[msg.metadata.message_id] = call_client(self.client_app, msg, context)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        for i in list(self.pending):
            if self.pending[i].ready():
                self.replies[i], context = self.pending.pop(i).get()
                self.contexts[context.node_id] = context
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        for i in ids:
            if i in self.pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    self.pending[i].wait(left)
                except Exception:
                    pass
        return self.pull_messages(ids)


def run_inprocess(cfg: RunConfig, observers: list[RoundObserver], progress: bool = True,
                  resume: bool = False) -> Path:
    """``inprocess`` (clients one after another) or ``parallel`` (forked workers)."""
    workers = 0
    if cfg.federation.backend == "parallel":
        workers = parallel_clients(cfg)
        dataset(cfg)  # load once here; the forked workers inherit it
    grid = InProcessGrid(client_app, cfg.federation.num_clients, workers=workers,
                         threads_per_worker=cfg.federation.threads_per_client)
    try:
        return serve(grid, cfg, observers=observers, progress=progress, resume=resume)
    finally:
        grid.close()


def parallel_clients(cfg: RunConfig) -> int:
    f = cfg.federation
    return f.parallel_clients or max(1, (os.cpu_count() or 1) // f.threads_per_client)


def run_ray(cfg: RunConfig, observers: list[RoundObserver], progress: bool = True, resume: bool = False) -> Path:
    # Ray (seconds to import, a multi-process runtime) is loaded only when this backend is chosen
    from flwr.simulation import run_simulation

    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):  # the simulation engine runs this in a thread of this process
        try:
            serve(grid, cfg, observers=observers, progress=progress, resume=resume)
        except BaseException as err:
            failure.append(err)
            raise

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: silence Ray's tip
    cores = os.cpu_count() or 1
    parallel = parallel_clients(cfg)
    backend_config = {
        "client_resources": {"num_cpus": max(1, cores // parallel), "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                   backend_config=backend_config)
    if failure:
        raise failure[0]
    return cfg.run_dir


def run(cfg: RunConfig, progress: bool = True, overwrite: bool = False, resume: bool = False,
        observers: Iterable[RoundObserver] = ()) -> Path:
    """Run ``cfg`` with its backend; everything lands in ``runs/<name>/``.

    ``resume`` continues a stopped run from its last checkpoint; ``observers``
    are called at the end of every round (training.server_app).
    """
    observers = list(observers)
    prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    for name in ("flwr", "flwr.common"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.federation.backend == "ray":
        return run_ray(cfg, observers, progress, resume)  # parallel and inprocess share the in-process grid
    return run_inprocess(cfg, observers, progress, resume)
