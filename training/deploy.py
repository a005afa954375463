"""``fedfinn deploy``: a Flower deployment (SuperLink + SuperNodes) on this machine.

    fedfinn deploy CONFIG.toml --nodes N [--set section.key=value ...]
                   [--resume | --overwrite] [--insecure] [--plain] [--timeout S]

What it does, in order (every process's log lands in ``runs/<name>/deploy/``):

1. resolves the config exactly as ``fedfinn run`` does (``--nodes N`` sets
   ``federation.num_clients``: one SuperNode per client) and prepares
   ``runs/<name>/`` the same way (``--overwrite``, ``--resume``);
2. makes a fresh test CA, a SuperLink certificate and one authentication key
   pair per SuperNode (``training.certs``) unless ``--certs DIR`` names
   existing ones, or ``--insecure`` is given (then: no TLS, no SuperNode
   authentication, and a warning says so);
3. starts ``flower-superlink`` on a free loopback port (the OS picks it, so
   parallel deployments never collide) with TLS, ``--enable-supernode-auth``
   and ``--disable-runtime-dependency-installation`` (the SuperLink never
   installs app dependencies at run time), registers the N node public keys,
   and starts N SuperNodes, node i with ``partition-id=i num-partitions=N`` in
   its node config: by default ``fedfinn supernode`` (training.fastnode:
   Flower's SuperNode with a warm ClientApp executor and adaptive polling),
   with ``--plain`` the stock ``flower-supernode``;
4. submits the app with ``flwr run`` (a Flower config in a private
   ``FLWR_HOME`` names the SuperLink); the SuperLink starts the ServerApp
   (fedfinn.server_app.main -> training.server_app.serve), which writes ``runs/<name>/``
   exactly like the other ways of running;
5. watches: a SuperNode that dies is reported and the run goes on (its
   missing replies are recorded in the round's JSON line); a ServerApp or
   SuperLink that dies stops the deployment with the hint to ``--resume``;
6. stops every process it started (SIGTERM to each process group and every
   descendant, SIGKILL after a grace period) on success, error, Ctrl-C or
   SIGTERM.

Ports: the SuperLink serves its Fleet, Control and Runtime APIs on one port
(flwr 1.42); each SuperNode has a Runtime API port for its ClientApps. All
listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

from .certs import make_certs
from .config import load_config
from .recorder import prepare_run_dir, read_metrics

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CONNECTION = "fedfinn"  # SuperLink connection name in the private Flower config


class DeployError(RuntimeError):
    pass


# --- small process utilities ---------------------------------------------------------

def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct ports that the OS reports free on ``host`` right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" if it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def alive(pid: int) -> bool:
    """Is ``pid`` running (a zombie is not)?"""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0  # size of the log when this process started (a log may hold earlier attempts)

    def output(self) -> str:
        """What this process has written to its log so far."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None


def stop_processes(procs: list[Proc], grace: float = 6.0, also: dict[int, str] | None = None) -> None:
    """SIGTERM every process group and descendant of ``procs``; SIGKILL what is left after ``grace``.

    ``also``: more processes (pid -> command line seen earlier), e.g. descendants
    whose parent already died; each is signalled only if its command line is
    unchanged (so a recycled pid is never hit).
    """
    pids: set[int] = set()
    for p in procs:
        pids.add(p.pid)
        pids.update(descendants(p.pid))
    for pid, cmd in (also or {}).items():
        if cmdline(pid) == cmd:
            pids.add(pid)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # each was started in its own session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        for p in procs:
            p.popen.poll()
        time.sleep(0.1)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --- the deployment ------------------------------------------------------------------

@dataclass
class Deployment:
    """A SuperLink and ``nodes`` SuperNodes on loopback; ``start``, ``submit``, ``wait``, ``stop``."""

    workdir: Path  # runs/<name>/deploy: logs, Flower homes, certificates
    nodes: int
    tls: bool = True
    auth: bool = True
    fast: bool = True  # fedfinn supernode (warm executor, adaptive polling); False = stock flower-supernode
    certs: Path | None = None  # existing certificates (training.certs layout); None = make fresh ones
    threads: int = 1  # torch threads per ClientApp (fast nodes)
    poll: float = 0.0  # fast nodes: longest idle wait between two polls of the SuperLink (0 = fastnode's default)
    preload: Path | None = None  # config whose data the fast nodes load before the first message
    app_dir: Path = REPO  # the Flower app (pyproject.toml) that ``flwr run`` bundles
    cwd: Path = field(default_factory=Path.cwd)  # of every process: the ServerApp resolves run.out_dir here
    wait_warm: bool = True  # submit only once every fast node has imported torch and loaded its data
    say: object = print
    procs: list[Proc] = field(default_factory=list)
    node_procs: list[Proc] = field(default_factory=list)
    node_ids: dict[int, int] = field(default_factory=dict)  # partition id -> Flower node id
    superlink: Proc | None = None
    port: int = 0
    known: dict[int, str] = field(default_factory=dict)  # every descendant seen: pid -> command line

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()  # every path handed to Flower must be absolute
        if self.preload is not None:
            self.preload = Path(self.preload).resolve()

    # -- environment ------------------------------------------------------------
    def _env(self, home: Path, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
                   FLWR_HOME=str(home))
        # Flower's processes start their helpers (flower-superexec, flwr-clientapp) by name from
        # PATH; a venv used without activation (make, CI) is not on it, so put it first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        pack = REPO.parent / "shared" / "data"
        if "FEDFINN_DATA" not in env and (pack / "cifar10-jpeg.npz").exists():
            env["FEDFINN_DATA"] = str(pack)  # the installed FAB does not sit beside ../shared
        if not self.fast:
            env.setdefault("FEDFINN_GRID_POLL", "3")  # --plain: Flower's own 3 s reply polling, for comparison
        env.update(extra or {})
        return env

    def _spawn(self, name: str, argv: list[str], home: Path) -> Proc:
        log = self.workdir / f"{name}.log"
        f = open(log, "ab")  # noqa: SIM115 (closed right after the start)
        offset = f.tell()
        home.mkdir(parents=True, exist_ok=True)
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=self.cwd, env=self._env(home), start_new_session=True)
        f.close()
        proc = Proc(name, popen, log, offset)
        self.procs.append(proc)
        return proc

    @property
    def link_home(self) -> Path:
        return self.workdir / "flwr_home" / "superlink"

    # -- commands -----------------------------------------------------------------
    def superlink_argv(self) -> list[str]:
        argv = [_bin("flower-superlink"), "--host", LOOPBACK, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            c = self.certs
            argv += ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
                     "--ssl-keyfile", str(c / "server.key")]
            if self.auth:
                argv += ["--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        return argv

    def node_argv(self, i: int, runtime_port: int) -> list[str]:
        common = ["--superlink", f"{LOOPBACK}:{self.port}", "--host", LOOPBACK, "--port", str(runtime_port),
                  "--node-config", f"partition-id={i} num-partitions={self.nodes}", "--max-wait-time", "120"]
        if self.tls:
            common += ["--root-certificates", str(self.certs / "ca.crt")]
            if self.auth:
                common += ["--auth-supernode-private-key", str(self.certs / f"node_{i}.key")]
        else:
            common += ["--insecure"]
        if not self.fast:
            return [_bin("flower-supernode"), *common]
        own = ["--threads", str(self.threads)] + (["--poll-max", str(self.poll)] if self.poll else [])
        if self.preload:
            own += ["--preload", str(self.preload)]
        return [sys.executable, "-m", "training.fastnode", *own, *common]

    def flower_config(self) -> str:
        connection: dict = {"address": f"{LOOPBACK}:{self.port}"}
        if self.tls:
            connection["root-certificates"] = str(self.certs / "ca.crt")
        else:
            connection["insecure"] = True
        return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.tls:
            self.auth = False
            self.say("WARNING: insecure deployment (--insecure): no TLS, no SuperNode authentication; "
                     "anyone who reaches the port can join or read the federation")
        elif self.certs is None:
            self.certs = make_certs(self.workdir / "certs", nodes=self.nodes if self.auth else 0)
        else:
            self.certs = Path(self.certs).resolve()
            missing = [n for n in ["ca.crt", "server.crt", "server.key",
                                   *([f"node_{i}.key" for i in range(self.nodes)] if self.auth else [])]
                       if not (self.certs / n).exists()]
            if missing:
                raise DeployError(f"--certs {self.certs}: missing {', '.join(missing)} (make certs NODES={self.nodes})")
        deadline = time.monotonic() + timeout
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            self.port = free_ports(1)[0]
            self.link_home.mkdir(parents=True, exist_ok=True)
            (self.link_home / "config.toml").write_text(self.flower_config())
            self.superlink = self._spawn("superlink", self.superlink_argv(), self.link_home)
            if self._wait_port(self.superlink, deadline):
                break
            stop_processes([self.superlink], grace=2)
            self.procs.remove(self.superlink)
            if attempt == 2 or "address already in use" not in self.superlink.output().lower():
                raise DeployError(f"the SuperLink did not start; {self.superlink.log}:\n{_tail(self.superlink.log)}")
        self.say(f"SuperLink on {LOOPBACK}:{self.port} ({'TLS' if self.tls else 'insecure'}"
                 f"{', SuperNode authentication' if self.auth else ''}), pid {self.superlink.pid}")
        if self.auth:
            self._register_nodes()
        ports = free_ports(self.nodes)
        for i in range(self.nodes):
            self.node_procs.append(self._spawn_node(i, ports[i]))
        self._wait_nodes(deadline)
        (self.workdir / "nodes.json").write_text(json.dumps(
            {"superlink": f"{LOOPBACK}:{self.port}", "tls": self.tls, "auth": self.auth,
             "nodes": {str(i): nid for i, nid in sorted(self.node_ids.items())}}, indent=2) + "\n")
        self.say(f"{self.nodes} SuperNode(s) connected ({'fedfinn supernode' if self.fast else 'flower-supernode'})")

    def _spawn_node(self, i: int, runtime_port: int) -> Proc:
        return self._spawn(f"supernode_{i}", self.node_argv(i, runtime_port), self.workdir / "flwr_home" / f"node_{i}")

    def _wait_port(self, proc: Proc, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if not proc.running():
                return False
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    pass
                out = proc.output()
                if "Uvicorn running" in out or "Application startup complete" in out:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        raise DeployError(f"the SuperLink did not come up in time; {proc.log}:\n{_tail(proc.log)}")

    def _register_nodes(self) -> None:
        """Register every node's public key with the SuperLink (what ``flwr supernode register`` does)."""
        old = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.link_home)
        try:
            client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
            try:
                for i in range(self.nodes):
                    res = client.RegisterNode(RegisterNodeRequest(
                        public_key=try_load_public_key(self.certs / f"node_{i}.pub"), name=f"partition-{i}"))
                    self.node_ids[i] = int(res.node_id)
            finally:
                client.close()
        finally:
            if old is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = old

    def _wait_nodes(self, deadline: float) -> None:
        pattern = re.compile(r"SuperNode ID: (\d+)")
        pending = set(range(self.nodes))
        retries = {i: 2 for i in pending}  # a runtime port taken between choosing and binding
        while pending:
            for i in list(pending):
                proc = self.node_procs[i]
                out = proc.output()
                m = pattern.search(out)
                ready = m is not None
                if ready and self.fast and self.preload and self.wait_warm:
                    ready = "warm in" in out  # the executor has loaded torch and the data
                if ready:
                    self.node_ids[i] = int(m.group(1))
                    pending.discard(i)
                elif not proc.running():
                    if retries[i] and "address already in use" in proc.output().lower():
                        retries[i] -= 1
                        self.node_procs[i] = self._spawn_node(i, free_ports(1)[0])
                        continue
                    raise DeployError(f"SuperNode {i} exited at start; {proc.log}:\n{_tail(proc.log)}")
            if pending and time.monotonic() > deadline:
                raise DeployError(f"SuperNode(s) {sorted(pending)} did not connect in time; see {self.workdir}")
            if pending:
                time.sleep(0.2)

    def submit(self, run_config: dict) -> Proc:
        """``flwr run`` the app with ``run_config``; the process streams the ServerApp's log until the run ends."""
        path = self.workdir / "run_config.toml"
        path.write_text(tomli_w.dumps(run_config))
        argv = [_bin("flwr"), "run", str(self.app_dir), CONNECTION, "--stream", "--run-config", str(path)]
        return self._spawn("serverapp", argv, self.link_home)

    def remember(self) -> None:
        """Note every descendant now alive: a process whose parent is killed loses its place in the tree."""
        for proc in self.procs:
            for pid in descendants(proc.pid):
                if pid not in self.known and alive(pid):
                    self.known[pid] = cmdline(pid)

    def serverapp_pids(self) -> list[int]:
        if self.superlink is None:
            return []
        self.remember()
        return [p for p, cmd in self.known.items() if "flwr-serverapp" in cmd and alive(p) and cmdline(p) == cmd]

    def wait(self, run: Proc, run_dir: Path, timeout: float | None = None, on_tick=None, tick: float = 0.5) -> None:
        """Until the run ends; raises DeployError if the ServerApp or the SuperLink dies first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen_server, gone_since = False, None
        dead_nodes: set[int] = set()

        def superlink_gone(wait: float = 0.0) -> bool:
            if self.superlink is None:
                return False
            try:
                self.superlink.popen.wait(timeout=wait) if wait else None
            except subprocess.TimeoutExpired:
                pass
            return not self.superlink.running()

        while True:
            if on_tick is not None:
                on_tick(self)
            # the log stream also ends when the SuperLink vanishes: look at the SuperLink first
            if superlink_gone(wait=0 if run.running() else 0.5):
                raise DeployError(f"the SuperLink exited (rc {self.superlink.popen.returncode}); "
                                  f"finished rounds are in {run_dir}: continue with --resume")
            if not run.running():
                return
            for i, proc in enumerate(self.node_procs):
                if i not in dead_nodes and not proc.running():
                    dead_nodes.add(i)
                    self.say(f"SuperNode {i} (node {self.node_ids.get(i)}) exited; the run goes on without it")
            if self.serverapp_pids():
                seen_server, gone_since = True, None
            elif seen_server:
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 3:
                    raise DeployError(f"the ServerApp exited before the run finished; finished rounds are in "
                                      f"{run_dir}: continue with --resume (log: {run.log})")
            if deadline is not None and time.monotonic() > deadline:
                raise DeployError(f"the run did not finish within {timeout:g} s")
            time.sleep(tick)

    def stop(self) -> None:
        previous = signal.getsignal(signal.SIGINT) if _main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # teardown is short and bounded: finish it
        try:
            # the nodes and the run first, then the SuperLink (which takes its SuperExec and ServerApp along)
            self.remember()
            order = [p for p in self.procs if p is not self.superlink]
            stop_processes(order)
            stop_processes([self.superlink] if self.superlink is not None else [], also=self.known)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def _bin(name: str) -> str:
    """A console script of this environment (beside the running python), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --- fedfinn deploy ----------------------------------------------------------------------

def deploy(config: str | None, overrides: list[str] = (), nodes: int = 0, *, overwrite: bool = False,
           resume: bool = False, insecure: bool = False, fast: bool = True, certs: str | None = None,
           threads: int = 1, poll: float = 0.0, timeout: float | None = None, wait_warm: bool = True, say=print,
           on_start=None, on_tick=None, tick: float = 0.5) -> Path:
    """Run ``config`` over a local deployment of ``nodes`` SuperNodes; returns the run folder.

    ``wait_warm=False`` submits the run as soon as the nodes are connected, so
    their warm-up overlaps the ServerApp's start (round 1 then pays the rest).
    ``on_start(deployment)`` and ``on_tick(deployment)`` (every ``tick`` s) are hooks for tests.
    """
    if any(";" in s for s in overrides):
        raise DeployError("an override may not contain ';' under deploy")
    cfg = load_config(config, list(overrides))
    n = nodes or cfg.federation.num_clients
    extra = []
    if n != cfg.federation.num_clients:
        say(f"federation.num_clients = {n}: one SuperNode per client")
        extra.append(f"federation.num_clients={n}")
    # Every process starts in this folder, so the ServerApp writes runs/<name>/ where `fedfinn run`
    # would, and the run's config.toml is the same (a run can be resumed under either runtime).
    all_overrides = [*overrides, *extra]
    cfg = load_config(config, all_overrides)
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    workdir = run_dir / "deploy"
    if workdir.exists() and not resume:
        shutil.rmtree(workdir)
    if resume and workdir.exists():  # keep the previous attempt's logs beside the new ones
        stamp, k = time.strftime("%Y%m%d-%H%M%S"), 1
        old = run_dir / f"deploy.{stamp}"
        while old.exists():
            k += 1
            old = run_dir / f"deploy.{stamp}.{k}"
        workdir.rename(old)
    workdir.mkdir(parents=True)
    (workdir / "config.toml").write_text(cfg.to_toml())
    done = len(read_metrics(run_dir))
    if resume and done >= cfg.federation.rounds:
        say(f"{run_dir}: all {cfg.federation.rounds} rounds done; nothing to resume")
        return run_dir

    d = Deployment(workdir, n, tls=not insecure, auth=not insecure, fast=fast,
                   certs=Path(certs) if certs else None, threads=threads, poll=poll, preload=workdir / "config.toml",
                   wait_warm=wait_warm, say=say)
    run_config = {"config": str(Path(config).resolve()) if config else "", "overrides": ";".join(all_overrides),
                  "resume": bool(resume)}
    try:
        d.start()
        if on_start is not None:
            on_start(d)
        t0 = time.perf_counter()
        run = d.submit(run_config)
        say(f"run submitted ({'resuming after round ' + str(done) if resume else 'new'}); "
            f"ServerApp log: {run.log}")
        d.wait(run, run_dir, timeout=timeout, on_tick=on_tick, tick=tick)
        rows = read_metrics(run_dir)
        if not rows or rows[-1]["round"] != cfg.federation.rounds or not (run_dir / "summary.json").exists():
            raise DeployError(f"the run ended after {len(rows)} of {cfg.federation.rounds} rounds; "
                              f"ServerApp log {run.log}:\n{_tail(run.log)}")
        say(f"{cfg.federation.rounds} rounds in {time.perf_counter() - t0:.1f} s over the deployment")
        return run_dir
    finally:
        d.stop()
