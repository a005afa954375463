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
import os
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from .config import RunConfig
from .recorder import prepare_run_dir

log = logging.getLogger("fedfinn")


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    A ClientApp that raises produces an error reply, as a SuperNode would, so
    the strategy sees the same thing in every runtime.
    """

    def __init__(self, client_app, num_nodes: int, node_config: dict | None = None):
        self.client_app = client_app
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id,
                             node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                             state=RecordDict(), run_config={})
            for i, node_id in enumerate(range(1001, 1001 + num_nodes))
        }
        self.replies: dict[str, Message] = {}
        self._run = None
        # Flower stamps every new Message with the identity of the task that
        # creates it; a SuperLink sets it for a real ServerApp process.
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

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
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = 0
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # the ClientApp failed: an error reply, as from a SuperNode
                log.debug("client %s failed:\n%s", msg.metadata.dst_node_id, traceback.format_exc())
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(cfg: RunConfig, progress: bool = True, resume: bool = False) -> Path:
    from .client_app import app as client_app
    from .server_app import serve

    grid = InProcessGrid(client_app, cfg.federation.num_clients)
    return serve(grid, cfg, progress=progress, resume=resume)


def run_ray(cfg: RunConfig, progress: bool = True, resume: bool = False) -> Path:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import serve

    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):  # the simulation engine runs this in a thread of this process
        try:
            serve(grid, cfg, progress=progress, resume=resume)
        except BaseException as err:
            failure.append(err)
            raise

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: silence Ray's tip
    f = cfg.federation
    cores = os.cpu_count() or 1
    parallel = f.parallel_clients or max(1, cores // f.threads_per_client)
    backend_config = {
        "client_resources": {"num_cpus": max(1, cores // parallel), "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=f.num_clients,
                   backend_config=backend_config)
    if failure:
        raise failure[0]
    return cfg.run_dir


def run(cfg: RunConfig, progress: bool = True, overwrite: bool = False, resume: bool = False) -> Path:
    """Run ``cfg`` with its backend; everything lands in ``runs/<name>/``.

    ``resume`` continues a stopped run from its last checkpoint.
    """
    prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    for name in ("flwr", "flwr.common"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.federation.backend == "ray":
        return run_ray(cfg, progress, resume)
    return run_inprocess(cfg, progress, resume)
