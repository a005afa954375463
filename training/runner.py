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

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from .client_app import app as client_app
from .config import RunConfig
from .flower_compat import set_message_ids, stamp_server_task_identity
from .recorder import prepare_run_dir
from .server_app import RoundObserver, serve
from .task import WIRE_STYPE, dataset, device_of, pack

log = logging.getLogger("fedfinn")

NODE_PREFIX = "node."  # node_states key prefix: node.<node id>.<record>.<array>


def call_client(client_app, msg: Message, context: Context) -> Message:
    """Run the ClientApp on one message; a failure becomes an error reply, as from a SuperNode."""
    try:
        return client_app(msg, context)
    except Exception as err:
        log.debug("client %s failed:\n%s", msg.metadata.dst_node_id, traceback.format_exc())
        return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


_WORKER_APP = None  # the ClientApp of a pool worker


def _worker_init(app, threads: int) -> None:
    global _WORKER_APP
    _WORKER_APP = client_app if app is None else app  # None: this module's (a spawned worker imports it)
    torch.set_num_threads(threads)


def _worker_call(msg: Message, context: Context) -> tuple[Message, Context]:
    # the context comes back too: what the ClientApp kept in context.state must persist, as on a SuperNode
    return call_client(_WORKER_APP, msg, context), context


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls on this machine, without servers.

    ``workers <= 1``: each message is handled right away in this process,
    clients one after another. ``workers > 1``: messages go to a pool of
    worker processes (one single-thread torch per worker by default):
    forked, so they inherit the loaded data set and train in parallel at no
    start-up cost, or started with ``spawn`` when clients train on a GPU
    (CUDA does not survive a fork). The pool's workers run this module's
    ClientApp. Either way a ClientApp that raises produces an error reply,
    as a SuperNode would, so the strategy sees the same thing in every
    runtime. What the nodes keep in ``context.state`` (update mode) can be
    saved with a checkpoint and restored (``node_states``).
    """

    def __init__(self, client_app, num_nodes: int, node_config: dict | None = None,
                 workers: int = 0, threads_per_worker: int = 1, start_method: str = "fork"):
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
            # a forked worker inherits any ClientApp; a spawned one imports this module's
            app = None if client_app is globals()["client_app"] else client_app
            self.pool = mp.get_context(start_method).Pool(workers, _worker_init, (app, threads_per_worker))
        stamp_server_task_identity()

    def close(self, stopped: bool = False) -> None:
        """End the worker pool: after a finished run the idle workers exit on their own (``Pool.close``);
        ``stopped`` (an error or Ctrl-C mid-round) kills them. ``Pool.terminate`` on idle workers is not
        used for the first: a worker killed while it holds the task queue's lock leaves another blocked on
        it for good, and the run hung after its last round (seen once in the medium study)."""
        if self.pool is not None:
            if stopped:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None

    def node_states(self) -> dict[str, np.ndarray]:
        """Every node's ``context.state`` arrays (our codec messages), named ``node.<id>.<record>.<array>``."""
        out = {}
        for node, ctx in self.contexts.items():
            for rec_name, record in ctx.state.array_records.items():
                for arr_name, arr in record.items():
                    if arr.dtype != "uint8" or arr.stype != WIRE_STYPE:
                        raise ValueError(f"node {node}: state {rec_name}/{arr_name} is not a codec message")
                    out[f"{NODE_PREFIX}{node}.{rec_name}.{arr_name}"] = np.frombuffer(arr.data, dtype=np.uint8)
        return out

    def restore_node_states(self, state: dict[str, np.ndarray]) -> None:
        """Put :meth:`node_states`' arrays back into the nodes' contexts."""
        records: dict[tuple[int, str], dict] = {}
        for key, value in state.items():
            if not key.startswith(NODE_PREFIX):
                continue
            node, rec_name, arr_name = key[len(NODE_PREFIX):].split(".", 2)
            records.setdefault((int(node), rec_name), {})[arr_name] = pack(value.tobytes())["message"]
        for (node, rec_name), arrays in records.items():
            self.contexts[node].state[rec_name] = ArrayRecord(arrays)

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
    """``inprocess`` (clients one after another) or ``parallel`` (worker processes)."""
    workers = 0
    gpu = device_of(cfg).type == "cuda"
    if cfg.federation.backend == "parallel":
        workers = parallel_clients(cfg)
        if not gpu:
            dataset(cfg)  # load once here; the forked workers inherit it
    grid = InProcessGrid(client_app, cfg.federation.num_clients, workers=workers,
                         threads_per_worker=cfg.federation.threads_per_client,
                         start_method="spawn" if gpu else "fork")
    try:
        run_dir = serve(grid, cfg, observers=observers, progress=progress, resume=resume,
                        eval_threads=eval_threads(cfg))
    except BaseException:
        grid.close(stopped=True)
        raise
    grid.close()
    return run_dir


def cores() -> int:
    """The cores this process may run on (the affinity mask: a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parallel_clients(cfg: RunConfig) -> int:
    """Clients trained at once by the parallel and ray backends: ``federation.parallel_clients``, else as many
    single-thread workers as there are cores (on a GPU: 2, sharing it)."""
    f = cfg.federation
    if f.parallel_clients:
        return f.parallel_clients
    if device_of(cfg).type == "cuda":
        return 2
    return max(1, cores() // f.threads_per_client)


def eval_threads(cfg: RunConfig) -> int | None:
    """torch threads of the server process: 1 while its evaluation overlaps training on the same cores
    (never more threads than cores), else torch's default."""
    return 1 if cfg.run.overlap_eval else None


def run_ray(cfg: RunConfig, observers: list[RoundObserver], progress: bool = True, resume: bool = False) -> Path:
    # Ray (seconds to import, a multi-process runtime) is loaded only when this backend is chosen
    from flwr.simulation import run_simulation

    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):  # the simulation engine runs this in a thread of this process
        try:
            serve(grid, cfg, observers=observers, progress=progress, resume=resume, eval_threads=eval_threads(cfg))
        except BaseException as err:
            failure.append(err)
            raise

    parallel = parallel_clients(cfg)
    gpu = device_of(cfg).type == "cuda"
    if not gpu:
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: silence Ray's tip
    n = cores()
    backend_config = {
        # clients share the GPU: each asks for 1/parallel of it, so Ray runs `parallel` at once
        "client_resources": {"num_cpus": max(1, n // parallel), "num_gpus": 1.0 / parallel if gpu else 0.0},
        "init_args": {"num_cpus": n, "include_dashboard": False, "logging_level": logging.WARNING,
                      "log_to_driver": True},
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
