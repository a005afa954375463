"""A Flower SuperNode without the per-message start-up cost: ``fedfinn supernode``.

Out of the box, a Flower 1.42 SuperNode (``flower-supernode``, default
``--isolation subprocess``) handles every message like this:

1. its Fleet loop asks the SuperLink for a message, and sleeps a fixed 3 s
   (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``) each time
   there is none: a new round waits 1.5 s on average before a node sees it;
2. its SuperExec polls the node's Runtime API for a task every 1 s
   (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``) and starts a brand-new
   ``flwr-clientapp`` process for it: Python, torch, brevitas and flwr are
   imported again (3-15 s on 2 busy cores) and the data set is loaded again
   (1-3 s from the decoded cache) for every single message;
3. the Fleet loop waits for the ClientApp's reply in steps of 0.5 s.

This module runs the same SuperNode (``flwr.supernode.cli.flower_supernode``,
same flags, same Fleet protocol, same ClientApp) with three changes:

* **a warm executor** (``--isolation process`` and our own SuperExec, the
  ``executor`` below): one process per SuperNode that has imported torch and
  the ClientApp's modules and loaded the node's data share once, and *forks*
  a child for every task. The child runs Flower's own ``run_clientapp`` (pull
  the message from the node's Runtime API, run the ClientApp, push the
  reply) and exits, so every message still gets a fresh process (crash
  isolation as in Flower), without paying the imports. Before the first
  fork, one training step warms torch up in the parent (one thread, so no
  OpenMP pool exists at fork time).
* **adaptive polling**: the Fleet loop's idle sleep starts at
  ``--poll-min`` (0.05 s) after any activity and backs off by 1.5x to
  ``--poll-max`` (1 s); waits for a ClientApp's reply poll local state at
  ``--poll-min``. Each idle poll is an HTTPS request that costs the SuperLink
  CPU time (on 2 cores, ~1.5 % of a core per node polling twice a second),
  so the bound trades pick-up latency against load.
* **no task polling**: the executor sleeps on a pipe that the SuperNode
  writes one byte to when it has stored a message (and its task), so it asks
  for the task at once and costs nothing while idle (a 5 s fallback poll
  covers a lost wake-up).
* the ClientApp code that runs is still the one in the run's FAB: the child
  compares the pre-imported ``training`` modules with the FAB's files and
  re-imports them from the FAB when they differ (only torch stays warm).

``fedfinn supernode --isolation subprocess ...`` runs plain Flower (no
patch, no warm executor), for comparison.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("fedfinn.node")

POLL_MIN = 0.05
POLL_MAX = 1.0


# --- SuperNode: adaptive Fleet polling -------------------------------------------

class _AdaptiveSleep:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``.

    That module calls ``time.sleep(3)`` when the SuperLink had no message and
    ``time.sleep(0.5)`` while it waits for a reply or its content: the first is
    replaced by a backoff from ``fast`` to ``slow``, the others by ``fast``.
    Every other attribute is the real ``time`` module's.
    """

    def __init__(self, fast: float = POLL_MIN, slow: float = POLL_MAX, wake_fd: int | None = None):
        self.fast, self.slow = fast, slow
        self.current = fast
        self.wake_fd = wake_fd  # write end of a pipe to the executor: "a task is waiting"
        self.busy = False

    def sleep(self, seconds: float) -> None:
        if seconds >= 3:  # idle poll of the SuperLink
            delay = self.current
            self.current = min(self.slow, self.current * 1.5)
            self.busy = False
        else:  # a message was stored (its task created): wake the executor, then wait fast
            if not self.busy and self.wake_fd is not None:
                try:
                    os.write(self.wake_fd, b"!")
                except OSError:
                    pass
            self.busy = True
            delay = min(seconds, self.fast)
            self.current = self.fast
        time.sleep(delay)

    def __getattr__(self, name):
        return getattr(time, name)


def patch_supernode_polling(fast: float = POLL_MIN, slow: float = POLL_MAX, wake_fd: int | None = None) -> None:
    """Replace the SuperNode's fixed 3 s / 0.5 s sleeps by adaptive ones.

    Targets flwr 1.42.0's ``flwr.supernode.start_client_internal``, which calls ``time.sleep(3)`` and
    ``time.sleep(0.5)`` on its module-level ``time``; tests/test_deploy.py fails if either changes."""
    from flwr.supernode import start_client_internal as sci

    if getattr(sci, "time", None) is not time and not isinstance(getattr(sci, "time", None), _AdaptiveSleep):
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses the time module: update the patch")
    sci.time = _AdaptiveSleep(fast, slow, wake_fd)


def _split_own_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preload", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--poll-min", type=float, default=POLL_MIN)
    p.add_argument("--poll-max", type=float, default=POLL_MAX)
    p.add_argument("--no-warmup", action="store_true")
    return p.parse_known_args(argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def supernode_main(argv: list[str]) -> int:
    """``fedfinn supernode [our flags] [flower-supernode flags]``: a SuperNode with a warm executor."""
    own, flower_args = _split_own_args(argv)
    isolation = _flag_value(flower_args, "--isolation")
    if isolation == "subprocess":  # plain Flower, as shipped
        sys.argv = ["flower-supernode", *flower_args]
        from flwr.supernode.cli import flower_supernode

        flower_supernode()
        return 0
    if isolation is None:
        flower_args += ["--isolation", "process"]
    port = _flag_value(flower_args, "--port")
    if port is None:
        port = "9094"  # flower-supernode's default Runtime API port
    host = _flag_value(flower_args, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    executor = [sys.executable, "-m", "training.fastnode", "executor",
                "--runtime-api-address", f"{host}:{port}", "--parent-pid", str(os.getpid()),
                "--poll-min", str(own.poll_min), "--poll-max", str(own.poll_max), "--threads", str(own.threads)]
    runtime_ca = _flag_value(flower_args, "--ssl-ca-certfile")
    executor += ["--root-certificates", runtime_ca] if runtime_ca else ["--insecure"]
    node_config = _flag_value(flower_args, "--node-config") or ""
    if own.preload:
        executor += ["--preload", own.preload, "--node-config", node_config]
    if own.no_warmup:
        executor += ["--no-warmup"]
    # The executor watches this process (--parent-pid) and exits with it; it sleeps on a pipe
    # that this process writes to when a message arrives, instead of polling for tasks.
    wake_read, wake_write = os.pipe()
    executor += ["--wake-fd", str(wake_read)]
    subprocess.Popen(executor, pass_fds=(wake_read,))  # noqa: S603
    os.close(wake_read)
    os.set_blocking(wake_write, False)  # never block the Fleet loop on a full pipe
    patch_supernode_polling(own.poll_min, own.poll_max, wake_write)
    sys.argv = ["flower-supernode", *flower_args]
    from flwr.supernode.cli import flower_supernode

    flower_supernode()
    return 0


# --- the warm executor -------------------------------------------------------------

def _preload(config_path: str | None, node_config: str, warmup: bool) -> None:
    """Import the ClientApp and its dependencies; load the data share; one warm-up step."""
    import torch

    torch.set_num_threads(1)  # no OpenMP worker threads may exist when we fork
    import training.client_app  # noqa: F401  (torch, brevitas, flwr, the ClientApp)

    if not config_path:
        return
    from . import task
    from .config import load_config

    cfg = load_config(config_path)
    task.dataset(cfg)
    pid = None
    for item in node_config.replace(",", " ").split():
        key, _, value = item.partition("=")
        if key.strip() == "partition-id":
            pid = int(value)
    if pid is not None and 0 <= pid < cfg.federation.num_clients:
        task.client_data(cfg, pid)
    if warmup:
        from . import loop

        model = task.make_model(cfg)
        d = task.dataset(cfg)
        loop.train(model, d.train_x[:4], d.train_y[:4], epochs=1, lr=0.01, batch_size=2,
                   seed=0, mean=d.mean, std=d.std)


def _same_as_fab(app_dir: Path) -> bool:
    """Are the pre-imported ``training`` modules byte-identical to the FAB's files?"""
    for name, module in list(sys.modules.items()):
        if name != "training" and not name.startswith("training."):
            continue
        path = getattr(module, "__file__", None)
        if not path:
            continue
        rel = Path(*name.split("."))
        rel = rel / "__init__.py" if path.endswith("__init__.py") else rel.with_suffix(".py")
        fab_file = app_dir / rel
        try:
            if fab_file.read_bytes() != Path(path).read_bytes():
                return False
        except OSError:
            return False
    return True


def _install_fab_check() -> None:
    """In a task child: re-import ``training`` from the FAB if it differs from what is pre-imported.

    Targets flwr 1.42.0's ``flwr.supernode.runtime.run_clientapp``, whose ``run_clientapp`` loads the
    ClientApp through the module-level ``get_load_client_app_fn``; the wrapper is installed there.
    tests/test_deploy.py fails if that function moves or stops being called that way."""
    from flwr.common.config import get_project_dir
    from flwr.supernode.runtime import run_clientapp as rc

    original = rc.get_load_client_app_fn

    def get_load_client_app_fn(*args, **kwargs):
        load = original(*args, **kwargs)

        def _load(fab_id: str, fab_version: str, fab_hash: str):
            app_dir = get_project_dir(fab_id, fab_version, fab_hash)
            if not _same_as_fab(app_dir):
                log.warning("the run's FAB differs from the pre-imported ClientApp: importing it from %s", app_dir)
                for name in [n for n in sys.modules if n == "training" or n.startswith("training.")]:
                    del sys.modules[name]
                sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent.parent]
            return load(fab_id, fab_version, fab_hash)

        return _load

    rc.get_load_client_app_fn = get_load_client_app_fn


def _run_task(args: argparse.Namespace, token: str, certificates: bytes | None) -> int:
    """Body of a forked task child: Flower's own ClientApp process, minus the imports."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        _install_fab_check()
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(runtime_api_address=args.runtime_api_address, token=token, insecure=args.insecure,
                      certificates=certificates, parent_pid=os.getppid(), runtime_dependency_install=False)
        code = 0
    except SystemExit as e:  # flwr_exit ends every ClientApp process this way
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def executor_main(argv: list[str]) -> int:
    """The warm SuperExec of one SuperNode: acquire ClientApp tasks, fork a child for each."""
    p = argparse.ArgumentParser(prog="fedfinn-node-executor")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates", default=None)
    p.add_argument("--preload", default=None)
    p.add_argument("--node-config", default="")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--poll-min", type=float, default=POLL_MIN)
    p.add_argument("--poll-max", type=float, default=POLL_MAX)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--wake-fd", type=int, default=None, help="pipe the SuperNode writes to when a task is waiting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedfinn-executor[%(process)d] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise

    t0 = time.perf_counter()
    _preload(args.preload, args.node_config, warmup=not args.no_warmup)
    log.info("warm in %.1f s (preload=%s)", time.perf_counter() - t0, args.preload or "-")

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    children: dict[int, float] = {}

    def stop(signum, _frame):
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while children and time.monotonic() < deadline:
            _reap(children, block=False)
            time.sleep(0.05)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT to us when the SuperNode is gone

    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    delay = args.poll_min
    while True:
        _reap(children, block=False)
        try:
            res = client.AcquireTask(request)
        except Exception as err:  # noqa: BLE001 - the SuperNode restarting, a timeout: try again
            log.warning("acquiring a task failed (%s: %s); retrying", type(err).__name__, err)
            time.sleep(args.poll_max)
            continue
        if res.HasField("task") and res.token:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(_run_task(args, res.token, certificates))
            children[pid] = time.perf_counter()
            log.info("task %d: ClientApp in child %d", res.task.task_id, pid)
            delay = args.poll_min
            continue
        if args.wake_fd is not None:  # (while a child runs, wake up now and then to reap and log it)
            _wait_for_wake(args.wake_fd, 0.2 if children else WAKE_FALLBACK)
        else:
            time.sleep(delay)
            delay = min(args.poll_max, delay * 1.5)


WAKE_FALLBACK = 5.0  # with a wake pipe, still look for tasks this often (a missed wake-up costs at most this)


def _wait_for_wake(fd: int, timeout: float) -> None:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        try:
            if not os.read(fd, 4096):  # the SuperNode closed the pipe: it is going away
                time.sleep(timeout)
        except BlockingIOError:
            pass


def _reap(children: dict[int, float], block: bool) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        started = children.pop(pid, None)
        if started is not None:
            code = os.waitstatus_to_exitcode(status)
            log.info("child %d exited (%s) after %.1f s", pid, code, time.perf_counter() - started)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "executor":
        sys.exit(executor_main(sys.argv[2:]))
    sys.exit(supernode_main(sys.argv[1:]))
