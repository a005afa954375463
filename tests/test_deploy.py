"""A real Flower deployment on loopback: SuperLink + SuperNodes + ServerApp, tiny CIFAR-10 runs.

Every deployment is torn down in ``deploy``'s ``finally``; each test also
checks that no process it saw is left (``_no_leftovers``).
"""

import os
import signal
import subprocess
import time

import pytest

from training.certs import make_certs
from training.config import load_config
from training.deploy import Deployment, DeployError, alive, cmdline, deploy, free_ports
from training.recorder import read_metrics
from training.runner import run

pytestmark = pytest.mark.slow

TINY = ["data.images_per_client=40", "data.test_images=100", "federation.fraction_train=1.0",
        'federation.backend="parallel"', "federation.threads_per_client=1"]


def _overrides(tmp_path, name, *extra):
    return [*TINY, f'run.out_dir="{tmp_path}"', f'run.name="{name}"', *extra]


class Watcher:
    """on_start/on_tick hooks: remembers every process of the deployment, acts once a condition holds."""

    def __init__(self, act=None):
        self.act, self.done, self.pids, self.deployment = act, False, {}, None

    def on_start(self, d):
        self.deployment = d
        self._collect(d)

    def on_tick(self, d):
        self._collect(d)
        if self.act is not None and not self.done:
            self.done = bool(self.act(d))

    def _collect(self, d):
        d.remember()
        self.pids.update({p.pid: cmdline(p.pid) for p in d.procs if p.pid not in self.pids})
        self.pids.update({k: v for k, v in d.known.items() if k not in self.pids})

    def no_leftovers(self):
        time.sleep(0.5)
        left = [f"{p} {cmd[:80]}" for p, cmd in self.pids.items() if alive(p) and cmdline(p) == cmd]
        assert not left, f"processes left behind: {left}"


def test_certs_make_a_chain_flower_accepts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    out = make_certs(tmp_path / "c", nodes=2, hosts=["10.1.2.3", "link.example"])
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example" in san.get_values_for_type(x509.DNSName)
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    for i in range(2):
        load_ssh_private_key((out / f"node_{i}.key").read_bytes(), None)  # what flower-supernode does
        load_ssh_public_key((out / f"node_{i}.pub").read_bytes())  # what flwr supernode register does
        assert (out / f"node_{i}.key").stat().st_mode & 0o077 == 0
    assert (out / "server.key").stat().st_mode & 0o077 == 0


def test_supernode_polling_patch_fits_this_flower():
    """The SuperNode's fixed sleeps are where fastnode expects them (flwr 1.42); the patch
    backs off when idle, stays fast while a ClientApp runs, and wakes the executor once."""
    import time as real_time

    from flwr.supernode import start_client_internal as sci

    from training.fastnode import _AdaptiveSleep, patch_supernode_polling

    src = open(sci.__file__).read()
    assert "time.sleep(3)" in src and "time.sleep(0.5)" in src
    r, w = os.pipe()
    try:
        patch_supernode_polling(0.001, 0.004, w)
        clock = sci.time
        assert isinstance(clock, _AdaptiveSleep) and clock.monotonic is real_time.monotonic
        delays = []
        for _ in range(6):
            delays.append(clock.current)
            clock.sleep(3)
        assert delays[0] == 0.001 and delays[-1] == 0.004  # backs off to the bound
        clock.sleep(0.5)
        clock.sleep(0.5)  # a ClientApp is running: fast, one wake-up only
        assert clock.current == 0.001
        os.set_blocking(r, False)
        assert os.read(r, 100) == b"!"
    finally:
        sci.time = real_time
        os.close(r)
        os.close(w)


def test_commands_secure_by_default_insecure_only_on_request(tmp_path, capsys):
    d = Deployment(tmp_path, nodes=2, certs=tmp_path)
    d.port = 1234
    link, node = d.superlink_argv(), d.node_argv(1, 4321)
    assert "--disable-runtime-dependency-installation" in link
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(link)
    assert "--insecure" not in link and "--insecure" not in node
    assert "--root-certificates" in node and "--auth-supernode-private-key" in node
    assert "partition-id=1 num-partitions=2" in node
    assert node[node.index("--superlink") + 1] == "127.0.0.1:1234"
    insecure = Deployment(tmp_path, nodes=2, tls=False, auth=False)
    insecure.port = 1234
    assert "--insecure" in insecure.superlink_argv() and "--enable-supernode-auth" not in insecure.superlink_argv()
    assert "--disable-runtime-dependency-installation" in insecure.superlink_argv()
    ports = free_ports(8)
    assert len(set(ports)) == 8


def test_insecure_needs_the_flag_and_says_so(tmp_path):
    """--insecure starts a SuperLink without TLS and says so; without it the CLI builds a TLS one."""
    from fedfinn.cli import build_parser

    assert build_parser().parse_args(["deploy", "c.toml"]).insecure is False
    lines = []
    d = Deployment(tmp_path / "w", nodes=0, tls=False, say=lines.append)
    try:
        d.start(timeout=90)
        assert "--insecure" in d.superlink_argv()
    finally:
        d.stop()
    assert any("insecure" in line.lower() and "no tls" in line.lower() for line in lines)
    assert not alive(d.superlink.pid)


def test_tls_auth_deployment_survives_killed_server_and_superlink_bit_for_bit(tmp_path, cifar10):
    """TLS + SuperNode auth. Attempt 1: the ServerApp is SIGKILLed after round 1; attempt 2
    (--resume): the SuperLink is SIGKILLed after round 2; attempt 3 (--resume) finishes.

    Two SuperNodes, both trained every round, the same ServerApp and ClientApp as
    in-process: every checkpoint equals the uninterrupted in-process run's byte for byte,
    and every round appears exactly once.
    """
    # overlap_eval off: a round's line is written as soon as the round ends, so the watcher (0.1 s
    # ticks) acts between rounds, not after the next one has trained
    extra = ["federation.num_clients=2", "federation.rounds=3", "run.overlap_eval=false"]
    ref = run(load_config(None, _overrides(tmp_path, "ref", *extra)), progress=False)
    dep = tmp_path / "dep"

    def kill_server_after_round_1(d):
        if len(read_metrics(dep)) >= 1:
            pids = d.serverapp_pids()
            for p in pids:
                os.kill(p, signal.SIGKILL)
            return bool(pids)
        return False

    def kill_superlink_after_round_2(d):
        if len(read_metrics(dep)) >= 2:
            os.kill(d.superlink.pid, signal.SIGKILL)
            return True
        return False

    kept = {}
    for attempt, (act, error) in enumerate([(kill_server_after_round_1, "ServerApp exited"),
                                            (kill_superlink_after_round_2, "SuperLink exited")]):
        w = Watcher(act)
        with pytest.raises(DeployError, match=error):
            deploy(None, _overrides(tmp_path, "dep", *extra), nodes=2, resume=attempt > 0, timeout=150,
                   wait_warm=False, on_start=w.on_start, on_tick=w.on_tick, tick=0.1)
        w.no_leftovers()
        assert w.done
        rows = read_metrics(dep)
        assert [r["round"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) < 3
        for r in rows:
            kept.setdefault(r["round"], (dep / "checkpoints" / f"round_{r['round']:03d}.ffnc").read_bytes())
        log = (w.deployment.workdir / "superlink.log").read_text()
        assert "TLS disabled" not in log and "authentication is disabled" not in log
    assert len(kept) >= 2

    w = Watcher()
    run_dir = deploy(None, _overrides(tmp_path, "dep", *extra), nodes=2, resume=True, timeout=150,
                     wait_warm=False, on_start=w.on_start, on_tick=w.on_tick)
    w.no_leftovers()
    rows, ref_rows = read_metrics(run_dir), read_metrics(ref)
    assert [r["round"] for r in rows] == [1, 2, 3]  # no round lost or repeated
    for r, k in kept.items():  # finished rounds untouched
        assert (run_dir / "checkpoints" / f"round_{r:03d}.ffnc").read_bytes() == k
    for r in (1, 2, 3):  # and the whole run equals the in-process one, bit for bit
        name = f"checkpoints/round_{r:03d}.ffnc"
        assert (run_dir / name).read_bytes() == (ref / name).read_bytes(), name
    for a, b in zip(rows, ref_rows):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert sorted(a["bytes_up"]) == sorted(b["bytes_up"]) and a["bytes_down"] == b["bytes_down"]
        assert sorted(a["clients"]) == [0, 1] and a["rejected"] == []
    nodes = (run_dir / "deploy" / "nodes.json").read_text()
    assert '"auth": true' in nodes and '"tls": true' in nodes
    assert len(list(run_dir.glob("deploy.*"))) == 2  # the logs of both interrupted attempts are kept


def test_supernode_killed_mid_round_the_run_goes_on(tmp_path, cifar10):
    """SIGKILL one of 3 SuperNodes (node, executor and ClientApp) while it trains in round 2."""
    # overlap_eval off: round 1's line is written before round 2 starts
    extra = ["federation.num_clients=3", "federation.rounds=3", "federation.round_timeout=10",
             "data.images_per_client=200", "run.overlap_eval=false"]
    victim = 2

    def kill_node_in_round_2(d):
        started = d.node_procs[victim].output().count("ClientApp in child")
        if len(read_metrics(tmp_path / "k")) >= 1 and started >= 2:
            os.killpg(d.node_procs[victim].pid, signal.SIGKILL)
            return True
        return False

    w = Watcher(kill_node_in_round_2)
    run_dir = deploy(None, _overrides(tmp_path, "k", *extra), nodes=3, timeout=200,
                     on_start=w.on_start, on_tick=w.on_tick, tick=0.1)
    w.no_leftovers()
    assert w.done
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    lost = w.deployment.node_ids[victim]
    assert sorted(rows[0]["clients"]) == [0, 1, 2]
    r2 = rows[1]
    assert sorted(r2["clients"]) == [0, 1]
    assert [x["node"] for x in r2["rejected"]] == [lost]
    assert "no reply within the 10 s round timeout" in r2["rejected"][0]["reason"]
    for r in rows:  # every sampled node either replied or is named with a reason
        replied = len(r["clients"])
        assert replied + len(r["rejected"]) == len(r["sampled_nodes"])
        assert victim not in r["clients"] or r["round"] == 1
    assert (run_dir / "summary.json").exists()


def test_update_mode_over_supernodes_equals_in_process(tmp_path, cifar10):
    """compression.update = "delta": each SuperNode keeps its copy of the global model and its
    residual in Flower's context.state between rounds; the deployment then equals the in-process
    run bit for bit (a node that lost its copy would refuse the downlink as stale)."""
    extra = ["federation.num_clients=2", "federation.rounds=3", 'compression.update="delta"']
    ref = run(load_config(None, _overrides(tmp_path, "dref", *extra)), progress=False)
    w = Watcher()
    run_dir = deploy(None, _overrides(tmp_path, "ddep", *extra), nodes=2, timeout=150, wait_warm=False,
                     on_start=w.on_start, on_tick=w.on_tick)
    w.no_leftovers()
    rows, ref_rows = read_metrics(run_dir), read_metrics(ref)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, ref_rows):
        assert a["rejected"] == [] and a["test_accuracy"] == b["test_accuracy"]
        assert sorted(a["bytes_up"]) == sorted(b["bytes_up"])
        assert sorted(a["bytes_down_each"]) == sorted(b["bytes_down_each"])
    for r in (1, 2, 3):
        name = f"checkpoints/round_{r:03d}.ffnc"
        assert (run_dir / name).read_bytes() == (ref / name).read_bytes(), name


def test_no_flower_process_left():
    out = subprocess.run(["pgrep", "-af", "flower-superlink|flower-supernode|flwr-serverapp|training.fastnode"],
                         capture_output=True, text=True).stdout
    mine = [line for line in out.splitlines() if "pytest-of" in line or "/tmp/pytest" in line]
    assert not mine, mine


def test_fab_check_patch_fits_this_flower(tmp_path, monkeypatch):
    """The warm executor's FAB check wraps flwr 1.42's run_clientapp.get_load_client_app_fn, which
    run_clientapp calls by that module-level name; the wrapper compares the pre-imported ``training``
    modules with the FAB's files and drops them (to import the FAB's) when they differ."""
    import inspect

    from flwr.supernode.runtime import run_clientapp as rc

    from training import fastnode

    assert "get_load_client_app_fn(" in inspect.getsource(rc.run_clientapp)
    original = rc.get_load_client_app_fn
    try:
        fastnode._install_fab_check()
        assert rc.get_load_client_app_fn is not original
    finally:
        monkeypatch.setattr(rc, "get_load_client_app_fn", original)
    repo = __import__("pathlib").Path(fastnode.__file__).resolve().parent.parent
    same = tmp_path / "same"
    shutil = __import__("shutil")
    shutil.copytree(repo / "training", same / "training", ignore=shutil.ignore_patterns("__pycache__"))
    assert fastnode._same_as_fab(same)
    (same / "training" / "loop.py").write_text("# changed\n")
    assert not fastnode._same_as_fab(same)
