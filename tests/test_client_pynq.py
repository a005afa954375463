"""client_pynq: the board protocol, the agent (fuzzed), the emulators and the host side.

* the package imports and serves with the standard library + numpy only
  (a subprocess whose imports of anything else fail);
* the agent answers >= 500 malformed requests with the right error and keeps
  serving, also after clients that vanish mid-transfer or stall;
* the batched bit-exact engine equals FINN's own execution tensor for tensor,
  and the runtime-weight codec reads back exactly what FINN wrote;
* a 3-round federated run of cnv-w1a1 with two bit-exact emulated boards (and
  one fast-mode board) on localhost: every round's on-device accuracy equals
  the accuracy the server measured for the same model on the same images.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client_pynq import protocol as P
from client_pynq.agent import Agent
from client_pynq.backends import BoardBackend, SyntheticBackend
from fedfinn.boards import BoardClient, BoardError, measure_round, plot, summarize, table

REPO = Path(__file__).resolve().parent.parent
TOKEN = "fuzz-token-0123456789"

# Imports of anything but the standard library, numpy and client_pynq itself fail.
BLOCK_IMPORTS = r"""
import importlib.abc, sys
ALLOWED = set(sys.stdlib_module_names) | {"numpy", "client_pynq"}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in ALLOWED:
            raise ImportError(f"blocked by the test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def _hdr(mtype=P.HELLO, meta=b"", plen=0, magic=P.MAGIC, version=P.VERSION, flags=0, rid=1, mlen=None):
    return P.HEADER.pack(magic, version, mtype, flags, rid, len(meta) if mlen is None else mlen, plen) + meta


def _hello_msg(token: str | None = None, rid: int = 1) -> bytes:
    """The bytes of a connection's first HELLO."""
    return _hdr(P.HELLO, json.dumps({} if token is None else {"token": token}).encode(), rid=rid)


# ----------------------------------------------------------------------------- agent processes


class AgentProcess:
    def __init__(self, serve_args: list[str], tmp: Path, name: str, blocked: bool = False, timeout: float = 180):
        self.port_file = tmp / f"{name}.port"
        self.log = tmp / f"{name}.log"
        args = ["serve", *serve_args, "--port", "0", "--port-file", str(self.port_file), "--exit-after-idle", "300"]
        if blocked:
            code = BLOCK_IMPORTS + f"from client_pynq.__main__ import main\nsys.exit(main({args!r}))\n"
            cmd = [sys.executable, "-c", code]
        else:
            cmd = [sys.executable, "-m", "client_pynq", *args]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.timeout = timeout
        self._port = None

    @property
    def port(self) -> int:
        if self._port is None:
            t0 = time.time()
            while not self.port_file.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
                if time.time() - t0 > self.timeout:
                    raise TimeoutError(f"agent not up after {self.timeout} s:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.1)
            self._port = int(self.port_file.read_text())
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def blocked_agent(tmp_path_factory):
    """A synthetic agent in a subprocess that cannot import anything but stdlib + numpy."""
    tmp = tmp_path_factory.mktemp("agent")
    a = AgentProcess(["--synthetic", "--token", TOKEN, "--read-timeout", "1", "--max-connections", "16",
                      "--max-testset-mib", "8", "--max-weights-mib", "1"], tmp, "synthetic", blocked=True)
    a.port  # noqa: B018 - wait until it listens
    yield a
    a.stop()


# ----------------------------------------------------------------------------- stdlib + numpy only


def test_package_imports_and_serves_with_stdlib_and_numpy_only(blocked_agent):
    code = BLOCK_IMPORTS + (
        "import client_pynq, client_pynq.protocol, client_pynq.agent, client_pynq.backends, client_pynq.__main__\n"
        "import client_pynq.__main__\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'finn', 'flwr', 'zstandard', 'onnx', 'onnxruntime', 'qonnx', 'brevitas', 'pynq'})\n"
        "assert not heavy, heavy\n"
        "try:\n    import client_pynq.dataflow\nexcept ImportError as e:\n    print('dataflow needs:', e)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "dataflow needs: blocked by the test: onnx" in out.stdout
    # ... and the agent started under the same block answers
    with BoardClient.from_address(blocked_agent.address, token=TOKEN, timeout=10) as c:
        h = c.hello()
    assert h["protocol"] == P.VERSION and h["backend"]["kind"] == "synthetic" and h["token_required"]


# ----------------------------------------------------------------------------- protocol units


def test_header_layout_and_roundtrip():
    assert P.HEADER_SIZE == 24
    a, b = socket.socketpair()
    with a, b:
        parts_items = [("images", np.arange(12, dtype=np.uint8).reshape(2, 2, 3)), ("x.dat", b"0000abcd\n")]
        parts, bufs = P.make_parts(parts_items)
        n = P.send_message(a, P.UPLOAD_TESTSET, {"parts": parts, "k": [1, "é"]}, bufs, request_id=7)
        raw = b.recv(24, socket.MSG_PEEK)
        magic, ver, typ, flags, rid, mlen, plen = struct.unpack("!4sBBHIIQ", raw)
        assert (magic, ver, typ, flags, rid) == (b"FFNB", 2, 2, 0, 7) and plen == 12 + 9 and n == 24 + mlen + plen
        msg = P.read_message(b)
        assert msg.meta["k"] == [1, "é"] and set(msg.parts) == {"images", "x.dat"}
        arr = P.part_array(*msg.parts["images"])
        assert arr.shape == (2, 2, 3) and arr.dtype == np.uint8 and arr[1, 1, 2] == 11
        assert bytes(msg.parts["x.dat"][1]) == b"0000abcd\n"


def test_part_table_and_token_checks():
    pay = bytearray(10)
    ok = [{"name": "a", "offset": 0, "size": 4}, {"name": "b", "offset": 4, "size": 6}]
    assert set(P.split_parts(ok, pay)) == {"a", "b"}
    for bad in ([{"name": "a", "offset": 1, "size": 9}], [{"name": "a", "offset": 0, "size": 11}],
                [{"name": "a", "offset": 0, "size": 4}], ok + [{"name": "a", "offset": 10, "size": 0}],
                [{"name": "", "offset": 0, "size": 10}], [{"name": "a", "offset": 0, "size": -1}], "x", [1],
                [{"name": "a", "offset": True, "size": 10}]):
        with pytest.raises(P.ProtocolError) as e:
            P.split_parts(bad, pay)
        assert e.value.code == "bad_request" and not e.value.close
    with pytest.raises(P.ProtocolError):
        P.part_array({"name": "i", "dtype": "float64", "shape": [10]}, memoryview(pay))
    with pytest.raises(P.ProtocolError):
        P.part_array({"name": "i", "dtype": "uint8", "shape": [3, 3]}, memoryview(pay))
    assert P.token_ok(None, None) and P.token_ok("t", "t")
    assert not P.token_ok("t", "u") and not P.token_ok("t", None) and not P.token_ok("t", 5)
    assert P.safe_file_name("3_0_MVAU_hls_1.dat")
    assert not any(P.safe_file_name(n) for n in ("../x.dat", "/etc/passwd", ".hidden", "a/b.dat", "a\0b", ""))


# ----------------------------------------------------------------------------- agent behaviour (in-process)


@pytest.fixture()
def synthetic():
    agent = Agent(SyntheticBackend(), port=0, read_timeout=2.0, max_connections=4)
    agent.start()
    yield agent
    agent.shutdown()


def _data(n=250, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return x


def test_full_cycle_results_and_errors(synthetic):
    h, p = synthetic.address
    x = _data()
    w = {"synthetic.dat": b"00000003\n0000000a\n"}
    y = SyntheticBackend.expected(x, 13)
    y[:50] = (y[:50] + 1) % 10  # 80 % right
    with BoardClient(h, p, timeout=20) as c:
        with pytest.raises(BoardError, match="no_testset"):
            c.evaluate()
        assert c.upload_testset(x, y)["testset"]["id"] == P.testset_id(x, y.astype(np.int64))
        with pytest.raises(BoardError, match="weights_mismatch"):
            c.set_weights({"other.dat": b"00000001\n"})
        with pytest.raises(BoardError, match="unsupported"):
            c.set_weights({"model.onnx": b"x"}, kind="onnx")
        r = c.set_weights(w, server_round=4)
        assert r["weights"]["round"] == 4 and r["weights"]["source"] == "dat"
        res = c.evaluate(batch_size=64, predictions=True)
        assert res["accuracy"] == 0.8 and res["images"] == 250 and res["batches"] == 4 and res["batch_size"] == 64
        assert np.array_equal(res["predictions"], SyntheticBackend.expected(x, 13))
        assert res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] and res["power_w"] is None
        assert c.evaluate(limit=10)["images"] == 10
        with pytest.raises(BoardError, match="bad_request"):
            c.evaluate(batch_size=0)
        with pytest.raises(BoardError, match="bad_request"):
            c.upload_testset(x[:, :16], y)
        # the connection is still good after errors that keep the stream in sync
        assert c.hello()["weights"]["round"] == 4
    # ok: the connection's first HELLO, upload, set, 2 x evaluate, hello
    assert synthetic.stats["ok"] == 6 and synthetic.stats["errors"] == 5 and synthetic.stats["authenticated"] == 1


def test_clients_that_vanish_or_stall_do_not_block_others(synthetic):
    h, p = synthetic.address
    x = _data(400)
    y = SyntheticBackend.expected(x, 0)
    stalled = socket.create_connection((h, p))
    stalled.sendall(_hello_msg() + _hdr(P.UPLOAD_TESTSET, plen=10_000)[:10])  # half a header, then nothing
    for _ in range(3):  # a client that dies mid-payload, three times
        s = socket.create_connection((h, p))
        parts, bufs = P.make_parts([("images", x), ("labels", y)])
        meta = P.encode_meta({"parts": parts})
        s.sendall(_hello_msg() + _hdr(P.UPLOAD_TESTSET, meta, x.nbytes + y.nbytes))
        s.sendall(bytes(bufs[0])[: x.nbytes // 3])
        s.close()
    time.sleep(0.2)
    with BoardClient(h, p, timeout=20) as c:  # meanwhile a good client is served at once
        t0 = time.time()
        c.upload_testset(x, y)
        c.set_weights({"synthetic.dat": b"0\n"})
        assert c.evaluate()["accuracy"] == 1.0
        assert time.time() - t0 < 2.0
    time.sleep(2.5)  # the stalled one hits its message's deadline
    stalled.settimeout(5)
    assert P.read_message(stalled, reply=True).type == P.HELLO
    reply = P.read_message(stalled, reply=True)
    assert reply.type == P.ERROR and reply.meta["code"] == "timeout" and reply.meta["close"]
    stalled.close()
    time.sleep(0.2)
    assert synthetic.stats["truncated"] == 3 and synthetic.stats["timeout"] == 1


def test_connection_limit_answers_busy(synthetic):
    """Authenticated connections beyond max_connections get busy; unauthenticated ones never take a slot."""
    h, p = synthetic.address
    silent = [socket.create_connection((h, p)) for _ in range(6)]
    held = [BoardClient(h, p, timeout=5) for _ in range(4)]
    for c in held:
        assert c.hello()["protocol"] == 2
    with pytest.raises(BoardError, match="busy"):
        BoardClient(h, p, timeout=5).hello()
    assert synthetic.connections["authenticated"] == 4
    for c in held[:1]:
        c.close()
    time.sleep(0.3)
    with BoardClient(h, p, timeout=5) as c:
        assert c.hello()["protocol"] == 2
    for c in held[1:]:
        c.close()
    for s in silent:
        s.close()


def test_measure_round_never_raises(synthetic, tmp_path):
    h, p = synthetic.address
    x = _data(100)
    y = SyntheticBackend.expected(x, 5)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    boards = [f"{h}:{p}", f"127.0.0.1:{dead_port}"]
    res = measure_round(boards, {"synthetic.dat": b"00000005\n"}, images=x, labels=y, server_round=1)
    assert res[0]["ok"] and res[0]["accuracy"] == 1.0 and res[0]["testset_uploaded"]
    assert not res[1]["ok"] and res[1]["stage"] == "hello" and "connection" in res[1]["error"]
    res2 = measure_round(boards[:1], {"synthetic.dat": b"00000006\n"}, images=x, labels=y, server_round=2)
    assert res2[0]["ok"] and not res2[0]["testset_uploaded"] and res2[0]["accuracy"] == 0.0
    # a model the board cannot take, a missing build: error entries, no exception
    res3 = measure_round(boards[:1], REPO / "nonexistent.onnx", images=x, labels=y, server_round=3)
    assert not res3[0]["ok"] and res3[0]["stage"] == "prepare"
    json.dumps(res + res2 + res3)  # JSON-ready
    md = table([{"round": 1, "accuracy": 1.0, "boards": res}])
    assert "| 1 |" in md and "connection" in md
    assert summarize([{"round": 2, "boards": res2}])[0]["board_accuracy"] == 0.0
    rows = [{"round": 1, "test_accuracy": 0.5, "boards": res}, {"round": 2, "test_accuracy": 0.6, "boards": res2}]
    import importlib.util

    if importlib.util.find_spec("matplotlib"):
        assert plot(rows, tmp_path / "boards.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- board backend (fake driver)


def test_board_backend_with_a_fake_driver(tmp_path, monkeypatch):
    """BoardBackend's own logic (staging, checks, batches, power) against stand-ins for
    finn_plus_driver and pynq, which exist only on a board image."""
    import types

    deploy = tmp_path / "deploy"
    (deploy / "bitfile").mkdir(parents=True)
    (deploy / "bitfile" / "finn-accel.bit").write_bytes(b"bit")
    rw = deploy / "driver" / "runtime_weights"
    rw.mkdir(parents=True)
    (rw / "1_0_Thresholding_rtl_0.dat").write_text("00000001\n00000002\n")
    (rw / "2_0_MVAU_hls_0.dat").write_text("00000003\n")
    io = {"idt": ["DataType['UINT8']"], "ishape_normal": [[1, 32, 32, 3]], "oshape_normal": [[1, 1]]}
    (deploy / "driver" / "settings.json").write_text(json.dumps(
        {"driver_information": {"driver_type": "FINNDMAOverlay", "io_shape_dict": io, "runtime_weights": True,
                                "platform": "zynq-iodma", "fclk_mhz": 100.0}}))
    calls = []

    class FakeOverlay:
        def __init__(self, bitfile, **kw):
            calls.append(("init", Path(bitfile).name, kw["batch_size"], Path(kw["runtime_weight_dir"]).name))
            self.runtime_weight_dir = kw["runtime_weight_dir"]
            self.batch_size = kw["batch_size"]
            self.offset = 0

        def load_runtime_weights(self, flush_accel=True, verify=True):
            files = {p.name: p.read_bytes() for p in Path(self.runtime_weight_dir).glob("*.dat")}
            if b"dead" in b"".join(files.values()):
                raise OSError("AXI-lite read-back differs")
            self.offset = SyntheticBackend.offset_of(files)
            calls.append(("load", sorted(files)))

        def execute(self, x):
            assert x.shape == (self.batch_size, 32, 32, 3) and x.dtype == np.uint8
            return SyntheticBackend.expected(x, self.offset).reshape(-1, 1)

    class Sensor:
        def __init__(self, v):
            self.value = v

    rails = {"VCCINT": types.SimpleNamespace(power=Sensor(1.5)), "VCCAUX": types.SimpleNamespace(power=Sensor(0.25))}
    monkeypatch.setitem(sys.modules, "finn_plus_driver",
                        types.SimpleNamespace(get_driver_class=lambda name: FakeOverlay))
    monkeypatch.setitem(sys.modules, "pynq", types.SimpleNamespace(get_rails=lambda: rails))
    b = BoardBackend(deploy, batch=50, state_dir=str(tmp_path / "state"))
    assert b.input_shape == (32, 32, 3) and b.weight_files == ["1_0_Thresholding_rtl_0.dat", "2_0_MVAU_hls_0.dat"]
    agent = Agent(b, port=0)
    agent.start()
    try:
        x = _data(120)
        with BoardClient(*agent.address, timeout=20) as c:
            assert c.hello()["weights"]["id"] == "build"
            c.upload_testset(x, SyntheticBackend.expected(x, 7))
            with pytest.raises(BoardError, match="weights_mismatch"):  # a word short
                c.set_weights({"1_0_Thresholding_rtl_0.dat": b"00000001\n", "2_0_MVAU_hls_0.dat": b"00000003\n"})
            c.set_weights({"1_0_Thresholding_rtl_0.dat": b"00000001\n00000002\n", "2_0_MVAU_hls_0.dat": b"4\n"})
            res = c.evaluate(batch_size=50)
            with pytest.raises(BoardError, match="backend_error.*read-back"):  # a write that fails half-way
                c.set_weights({"1_0_Thresholding_rtl_0.dat": b"0000dead\n00000002\n", "2_0_MVAU_hls_0.dat": b"4\n"})
            with pytest.raises(BoardError, match="no_weights"):
                c.evaluate()
        assert res["accuracy"] == 1.0 and res["batches"] == 3 and res["mode"].startswith("board")
        assert res["power_w"]["mean"] == 1.75 and set(res["power_w"]["rails"]) == {"VCCINT", "VCCAUX"}
        assert calls[0] == ("init", "finn-accel.bit", 50, "runtime_weights")
        assert calls[1] == ("load", ["1_0_Thresholding_rtl_0.dat", "2_0_MVAU_hls_0.dat"])
        assert len(list((tmp_path / "state").glob("rw-*"))) == 2  # the good one and the failed one
    finally:
        agent.shutdown()


def _fake_deploy(tmp_path: Path, monkeypatch, files: dict[str, str]):
    """A deployment package and a stand-in for finn_plus_driver whose load_runtime_weights reads
    the .dat words the way the real one does (``np.fromiter(int(w, 16)), dtype=np.uint32)``)."""
    import types

    deploy = tmp_path / "deploy"
    (deploy / "bitfile").mkdir(parents=True)
    (deploy / "bitfile" / "finn-accel.bit").write_bytes(b"bit")
    rw = deploy / "driver" / "runtime_weights"
    rw.mkdir(parents=True)
    for name, text in files.items():
        (rw / name).write_text(text)
    io = {"idt": ["DataType['UINT8']"], "ishape_normal": [[1, 32, 32, 3]], "oshape_normal": [[1, 1]]}
    (deploy / "driver" / "settings.json").write_text(json.dumps(
        {"driver_information": {"driver_type": "FINNDMAOverlay", "io_shape_dict": io, "runtime_weights": True}}))
    loads = []

    class DriverLike:
        def __init__(self, bitfile, **kw):
            self.runtime_weight_dir = kw["runtime_weight_dir"]
            self.batch_size = kw["batch_size"]

        def load_runtime_weights(self, flush_accel=True, verify=True):
            for f in sorted(Path(self.runtime_weight_dir).glob("*.dat")):  # finn_plus_driver/overlays/dma.py
                np.fromiter([int(x, 16) for x in f.read_text().strip().split()], dtype=np.uint32)
            loads.append(self.runtime_weight_dir)

    monkeypatch.setitem(sys.modules, "finn_plus_driver", types.SimpleNamespace(get_driver_class=lambda n: DriverLike))
    return deploy, loads


def test_board_backend_refuses_words_the_driver_cannot_take(tmp_path, monkeypatch):
    """Finding 4: a word ``-1`` (or > 32 bits, or garbage after the 4th word) is ``weights_mismatch``
    before anything is staged or written, not a driver OverflowError half-way (``backend_error``)."""
    built = "".join(f"{i:08x}\n" for i in range(6))
    deploy, loads = _fake_deploy(tmp_path, monkeypatch, {"1_0_MVAU_hls_0.dat": built})
    b = BoardBackend(deploy, batch=10, state_dir=str(tmp_path / "state"), power=False)
    agent = Agent(b, port=0)
    agent.start()
    try:
        with BoardClient(*agent.address, timeout=20) as c:
            c.set_weights({"1_0_MVAU_hls_0.dat": built.encode()})
            assert len(loads) == 1
            words = built.split()
            for bad in ("-1", "100000000", "+5", "0x1", "1_0", "zz", "\u0661"):
                for pos in (0, 5):  # the first word and the last (only the first 4 were looked at)
                    w = list(words)
                    w[pos] = bad
                    with pytest.raises(BoardError) as e:
                        c.set_weights({"1_0_MVAU_hls_0.dat": "\n".join(w).encode()})
                    assert e.value.code == "weights_mismatch", (bad, pos, e.value)
            assert c.hello()["weights"]["source"] == "dat"  # the good update stands
        assert len(loads) == 1 and len(list((tmp_path / "state").glob("rw-*"))) == 1  # nothing staged
    finally:
        agent.shutdown()


# ----------------------------------------------------------------------------- attacker review: the agent


@pytest.fixture()
def guarded():
    """An agent with a token, short deadlines and small pools."""
    agent = Agent(SyntheticBackend(), port=0, token=TOKEN, read_timeout=1.0, auth_timeout=1.5, max_connections=2,
                  max_pending=4, limits=P.Limits(max_testset=256 * 2**20))
    agent.start()
    yield agent
    agent.shutdown()


def test_silent_peers_cannot_lock_the_host_out(guarded):
    """Finding 2: silent connections without the token fill only the pending pool (the oldest is
    evicted by each new one) and are closed at the auth deadline; the host gets in at once."""
    h, p = guarded.address
    silent = [socket.create_connection((h, p)) for _ in range(12)]
    time.sleep(0.3)
    t0 = time.monotonic()
    for _ in range(3):
        with BoardClient(h, p, token=TOKEN, timeout=5) as c:
            assert c.hello()["token_required"]
            assert c.hello()["limits"]["max_pending"] == 4
    assert time.monotonic() - t0 < 1.5
    assert guarded.stats["busy"] == 0 and guarded.stats["evicted"] >= 12 - 4 + 1  # the host evicted one itself
    time.sleep(2.0)  # those still pending hit the auth deadline
    for s in silent:
        s.settimeout(3)
        assert s.recv(100) == b""  # closed by the agent, nothing sent to them
        s.close()
    assert guarded.connections == {"pending": 0, "authenticated": 0}
    assert guarded.stats["auth_timeout"] >= 1


def _drip(sock: socket.socket, data: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send ``data`` one byte every ``every`` s until the agent answers (or ``limit`` s):
    (seconds until then, what came back)."""
    import select

    t0 = time.monotonic()
    for b in data:
        try:
            sock.sendall(bytes([b]))
        except OSError:
            break
        if select.select([sock], [], [], every)[0] or time.monotonic() - t0 > limit:
            break
    sock.settimeout(limit)
    try:
        got = sock.recv(4096)
    except OSError:
        got = b""
    return time.monotonic() - t0, got


def test_a_message_has_a_deadline_not_a_timeout_per_read(guarded):
    """Finding 2: one byte every 0.25 s (a read timeout of 1 s never fires) is cut at the
    message's deadline, before and after authentication."""
    h, p = guarded.address
    s = socket.create_connection((h, p))  # before the HELLO: auth_timeout 1.5 s from the accept
    dt, got = _drip(s, _hello_msg(TOKEN), 0.25, 8.0)
    s.close()
    assert got[:4] == P.MAGIC and got[5] == P.ERROR and b'"timeout"' in got and dt < 2.5, (dt, got[:80])
    s = socket.create_connection((h, p))  # authenticated, then an EVALUATE header that drips
    s.sendall(_hello_msg(TOKEN))
    s.settimeout(5)
    assert P.read_message(s, reply=True).type == P.HELLO
    dt, got = _drip(s, _hdr(P.EVALUATE, json.dumps({"limit": 1}).encode()), 0.25, 8.0)
    s.close()
    assert got[:4] == P.MAGIC and got[5] == P.ERROR and b'"timeout"' in got and dt < 2.0, (dt, got[:80])
    assert guarded.stats["timeout"] == 2


def test_unauthenticated_claims_are_refused_from_the_header():
    """Finding 2: a 24-byte header claiming a 256 MiB upload (4 connections at once), or a HELLO with
    a payload or oversized metadata, is refused at once; nothing of the claim is allocated."""
    import tracemalloc

    guarded = Agent(SyntheticBackend(), port=0, token=TOKEN, read_timeout=1.0, auth_timeout=1.5, max_pending=16,
                    limits=P.Limits(max_testset=256 * 2**20))
    guarded.start()
    h, p = guarded.address
    tok = json.dumps({"token": TOKEN}).encode()
    claims = [(_hdr(P.UPLOAD_TESTSET, tok, 256 * 2**20), "unauthorized")] * 4 + [
        (_hdr(P.SET_WEIGHTS, tok, 64 * 2**20), "unauthorized"), (_hdr(P.HELLO, tok, 2**20), "too_large"),
        (_hdr(P.HELLO, b"", 0, mlen=P.MAX_HELLO_META + 1), "too_large"), (_hdr(P.HELLO, b"", 0, mlen=2**32 - 1), "too_large")]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        socks = [socket.create_connection((h, p), timeout=5) for _ in claims]
        t0 = time.monotonic()
        for s, (data, _) in zip(socks, claims):
            s.sendall(data)
        replies = [P.read_message(s, reply=True) for s in socks]
        dt = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    for s in socks:
        s.close()
    assert [(r.type, r.meta["code"], r.meta["close"]) for r in replies] == [(P.ERROR, c, True) for _, c in claims]
    assert dt < 0.9  # from the header: no waiting for a body (the read timeout is 1 s)
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated for claims"
    with BoardClient(h, p, token=TOKEN, timeout=5) as c:
        assert c.hello()["stats"]["auth_failed"] == len(claims)
    guarded.shutdown()


def _fake_agent(reply: bytes, read_first: bool = True):
    """A listening socket whose every connection gets ``reply`` (after reading one request); closes."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if read_first:
                        P.read_message(conn)
                    conn.sendall(reply)
                    time.sleep(0.1)
                except Exception:
                    pass
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], stop


def test_the_host_bounds_what_it_reads_from_a_board():
    """Finding 3: reply headers claiming 2^30, 2^40, 2^63 payload bytes (or 4 GiB of metadata, a
    payload on a reply that has none, an unknown type) give BoardError at once; nothing is allocated."""
    import tracemalloc

    def head(mtype=P.HELLO, mlen=2, plen=0, flags=P.FLAG_REPLY):
        return P.HEADER.pack(P.MAGIC, P.VERSION, mtype, flags, 1, mlen, plen) + b"{}"

    cases = [head(plen=2**30), head(plen=2**40), head(plen=2**63), head(plen=2**64 - 1), head(mlen=2**32 - 1),
             head(P.ERROR, plen=10), head(77), head(P.EVALUATE, plen=P.DEFAULT_MAX_REPLY_PAYLOAD + 1)]
    tracemalloc.start()
    try:
        for reply in cases:
            port, stop = _fake_agent(reply)
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                t0 = time.monotonic()
                with pytest.raises(BoardError) as e:
                    BoardClient("127.0.0.1", port, token="t", timeout=5).hello()
                assert time.monotonic() - t0 < 3.0
                assert tracemalloc.get_traced_memory()[1] - base < 4 * 2**20, (reply[:24], e.value)
                assert e.value.code == "connection" and ("too_large" in e.value.message or "bad_type" in
                                                         e.value.message), e.value
            finally:
                stop.set()
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- fuzz


def _exchange(addr, data: bytes, close_after_send=False, timeout=5.0, auth=False):
    """Send raw bytes (``auth``: after a good HELLO with the token); return the reply (type, meta)
    or None if the agent closed / nothing came."""
    s = socket.create_connection(addr, timeout=timeout)
    try:
        if auth:
            s.sendall(_hello_msg(TOKEN))
            if not close_after_send:
                h = P.read_message(s, P.Limits(max_meta=1 << 20), reply=True)
                assert h.type == P.HELLO, h.meta
        s.sendall(data)
        if close_after_send:
            return None
        try:
            m = P.read_message(s, P.Limits(max_meta=1 << 20), reply=True)
            return m.type, m.meta, s
        except (P.ConnectionClosed, P.ProtocolError, OSError):
            return None
    finally:
        if close_after_send:
            s.close()


def _still_good(addr) -> dict:
    with BoardClient(*addr, token=TOKEN, timeout=10) as c:
        return c.hello()


def test_fuzz_malformed_requests(blocked_agent):
    addr = ("127.0.0.1", blocked_agent.port)
    rng = random.Random(1234)
    tok = json.dumps({"token": TOKEN}).encode()
    sent = {}
    codes = {}

    def expect(category, data, code, close, auth=False):
        sent[category] = sent.get(category, 0) + 1
        for _ in range(50):
            r = _exchange(addr, data, auth=auth)
            assert r is not None, f"{category}: no reply"
            typ, meta, s = r
            if meta.get("code") != "busy":
                break
            s.close()  # all connection slots taken for a moment (handlers of vanished clients): again
            time.sleep(0.05)
        try:
            assert typ == P.ERROR and meta["code"] == code, (category, meta)
            assert meta["close"] == close, (category, meta)
            codes[code] = codes.get(code, 0) + 1
            if not close:  # the stream is still in step: a good request on the same connection
                P.send_message(s, P.HELLO, {"token": TOKEN}, request_id=99)
                ok = P.read_message(s, reply=True)
                assert ok.type == P.HELLO and ok.request_id == 99
        finally:
            s.close()

    def vanish(category, data, auth=False):
        sent[category] = sent.get(category, 0) + 1
        _exchange(addr, data, close_after_send=True, auth=auth)

    for _ in range(80):  # truncated headers: 1..23 bytes of a header, then the client leaves
        vanish("truncated header", _hdr(meta=tok)[: rng.randint(1, 23)])
    for _ in range(40):  # bad magic
        expect("bad magic", bytes(rng.getrandbits(8) for _ in range(4)).replace(b"F", b"G") + _hdr(meta=tok)[4:],
               "bad_magic", True)
    for v in [0, 1, 3, 17, 128, 255] * 5:  # other protocol versions (1: the old one, before HELLO-first)
        expect("bad version", _hdr(meta=tok, version=v), "bad_version", True)
    for _ in range(40):  # huge declared lengths, on an authenticated connection
        k = rng.choice(["meta", "payload", "both"])
        mlen = rng.randint(P.DEFAULT_MAX_META + 1, 2**32 - 1) if k != "payload" else len(tok)
        plen = rng.randint(2**21, 2**64 - 1) if k != "meta" else 0
        mt = rng.choice([P.HELLO, P.UPLOAD_TESTSET, P.SET_WEIGHTS, P.EVALUATE])
        expect("huge length", P.HEADER.pack(P.MAGIC, 2, mt, 0, 1, mlen, plen) + tok, "too_large", True, auth=True)
    for _ in range(40):  # ... and as the first message: refused from the header, whatever the token
        mlen, plen = rng.choice([(len(tok), rng.randint(1, 2**64 - 1)), (rng.randint(P.MAX_HELLO_META + 1, 2**32 - 1), 0)])
        mt = rng.choice([P.HELLO, P.UPLOAD_TESTSET, P.SET_WEIGHTS, P.EVALUATE])
        expect("huge length before HELLO", P.HEADER.pack(P.MAGIC, 2, mt, 0, 1, mlen, plen) + tok,
               "too_large" if mt == P.HELLO else "unauthorized", True)
    for mt in [P.UPLOAD_TESTSET, P.SET_WEIGHTS, P.EVALUATE] * 10:  # a request before the HELLO
        expect("request before HELLO", _hdr(mtype=mt, meta=tok), "unauthorized", True)
    for mt in list(range(5, 40)) + [0, 100, 200, 254]:  # unknown message types
        expect("bad type", _hdr(mtype=mt, meta=tok), "bad_type", False, auth=True)
    for f in [1, 2, 4, 0x8000, 0xFFFF] * 4:  # flag bits
        expect("bad flags", _hdr(meta=tok, flags=f), "bad_flags", False, auth=True)
    bad_json = [b"{", b"[1,2]", b"\xff\xfe\x00", b'"str"', b"nan", b"{'a':1}", b"[" * 5000 + b"]" * 5000,
                b'{"a":', b"\x00" * 10, b"null", b"123", b'{"token": "' + TOKEN.encode() + b'"']
    for _ in range(3):
        for j in bad_json:
            expect("bad json", _hdr(meta=j), "bad_json", False, auth=True)
    for _ in range(40):  # wrong tokens
        t = rng.choice([None, "", "x", TOKEN[:-1], TOKEN + "0", 12, ["a"], TOKEN.upper()])
        meta = json.dumps({} if t is None else {"token": t}).encode()
        expect("bad token", _hdr(meta=meta), "unauthorized", True)
    # malformed but well-framed requests (stream in step)
    img = np.zeros((4, 32, 32, 3), np.uint8)
    lab = np.zeros(4, np.int64)
    good_parts, _ = P.make_parts([("images", img), ("labels", lab)])
    pay = img.tobytes() + lab.tobytes()

    def req(mtype, meta, payload=b""):
        m = json.dumps({"token": TOKEN, **meta}).encode()
        return _hdr(mtype=mtype, meta=m, plen=len(payload)) + payload

    bad_requests = [
        req(P.UPLOAD_TESTSET, {"parts": good_parts[:1]}, pay[: img.nbytes]),
        req(P.UPLOAD_TESTSET, {"parts": [dict(good_parts[0], shape=[4, 32, 32])], **{}}, img.tobytes()),
        req(P.UPLOAD_TESTSET, {"parts": [dict(good_parts[0], dtype="float32"), good_parts[1]]}, pay),
        req(P.UPLOAD_TESTSET, {"parts": [dict(good_parts[0], shape=[2, 64, 32, 3]), good_parts[1]]}, pay),
        req(P.UPLOAD_TESTSET, {"parts": [good_parts[0], dict(good_parts[1], dtype="uint8", shape=[32])]}, pay),
        req(P.UPLOAD_TESTSET, {"parts": "nope"}, pay),
        req(P.UPLOAD_TESTSET, {}, pay),
        req(P.UPLOAD_TESTSET, {"parts": [dict(good_parts[0], offset=1), good_parts[1]]}, pay),
        req(P.SET_WEIGHTS, {"kind": "dat", "parts": [{"name": "../../x.dat", "offset": 0, "size": 2}]}, b"1\n"),
        req(P.SET_WEIGHTS, {"kind": "zip", "parts": [{"name": "synthetic.dat", "offset": 0, "size": 2}]}, b"1\n"),
        req(P.SET_WEIGHTS, {"kind": "dat", "round": "3", "parts": [{"name": "synthetic.dat", "offset": 0,
                                                                     "size": 2}]}, b"1\n"),
        req(P.SET_WEIGHTS, {"kind": "dat"}),
        req(P.EVALUATE, {"batch_size": "10"}),
        req(P.EVALUATE, {"batch_size": 0}),
        req(P.EVALUATE, {"batch_size": True}),
        req(P.EVALUATE, {"batch_size": 2**40}),
        req(P.EVALUATE, {"limit": -3}),
        req(P.EVALUATE, {"predictions": "yes"}),
    ]
    for _ in range(3):
        for r in bad_requests:
            expect("bad request", r, "bad_request", False, auth=True)
    for _ in range(5):
        expect("weights mismatch", req(P.SET_WEIGHTS, {"kind": "dat", "parts": [
            {"name": "other.dat", "offset": 0, "size": 2}]}, b"1\n"), "weights_mismatch", False, auth=True)
        expect("weights mismatch", req(P.SET_WEIGHTS, {"kind": "dat", "parts": [
            {"name": "synthetic.dat", "offset": 0, "size": 2}]}, b"zz"), "weights_mismatch", False, auth=True)
        expect("weights mismatch", req(P.SET_WEIGHTS, {"kind": "dat", "parts": [
            {"name": "synthetic.dat", "offset": 0, "size": 3}]}, b"-1\n"), "weights_mismatch", False, auth=True)
    for _ in range(40):  # clients that vanish mid-payload
        n = rng.randint(1000, 500_000)
        m = json.dumps({"parts": [{"name": "images", "offset": 0, "size": n}]}).encode()
        vanish("disconnect mid-payload", _hdr(mtype=P.UPLOAD_TESTSET, meta=m, plen=n) + os.urandom(rng.randint(0, n - 1)),
               auth=True)
    for _ in range(80):  # random garbage
        vanish("random bytes", os.urandom(rng.randint(1, 300)))
    for _ in range(30):  # random garbage after a valid magic
        vanish("random after magic", P.MAGIC + os.urandom(rng.randint(1, 100)))

    total = sum(sent.values())
    assert total >= 500, sent
    assert blocked_agent.alive()
    # a complete good exchange after all of that
    x = _data(50)
    with BoardClient.from_address(blocked_agent.address, token=TOKEN, timeout=10) as c:
        c.upload_testset(x, SyntheticBackend.expected(x, 2))
        c.set_weights({"synthetic.dat": b"00000002\n"})
        assert c.evaluate()["accuracy"] == 1.0
        stats = c.hello()["stats"]
    answered = sum(codes.values())
    print(f"\nfuzz: {total} malformed requests {json.dumps(sent)}; error replies by code {json.dumps(codes)};"
          f" agent counters {json.dumps(stats)}")
    assert stats["errors"] >= answered and stats["truncated"] >= sent["disconnect mid-payload"]
    assert codes["bad_json"] == 3 * len(bad_json)
    # bad tokens, requests before the HELLO, huge lengths after and before it: each refused, each counted
    assert codes["unauthorized"] + codes["too_large"] == sent["bad token"] + sent["request before HELLO"] + \
        sent["huge length"] + sent["huge length before HELLO"]
    assert stats["auth_failed"] >= sent["bad token"] + sent["request before HELLO"] + sent["huge length before HELLO"]


# ----------------------------------------------------------------------------- FINN builds (host side)

from export.finn_env import finn_missing as _finn_missing  # noqa: E402

finn_missing = _finn_missing()

needs_finn = pytest.mark.skipif(finn_missing is not None, reason=f"finn-plus not importable: {finn_missing}")


def light_build(qonnx: Path, out: Path) -> Path:
    """`hw build` up to the folded model, plus the driver's runtime-weight files and the weights recipe
    (no code generation)."""
    from hw.build import FINAL_STEP, HW_STEPS, build, make_config
    from training.data import dataset_stats

    mean, std = dataset_stats("cifar10")
    cfg = make_config(qonnx, board="Pynq-Z2", output_dir=out, name=qonnx.stem, mean=list(mean), std=list(std))
    cfg.steps = HW_STEPS[: HW_STEPS.index(FINAL_STEP) + 1] + ["step_pynq_driver", "step_record_weights_recipe"]
    build(cfg, echo=None)
    return out


FED = ["data.images_per_client=20", "data.test_images=100", "federation.num_clients=5", "federation.rounds=3",
       "federation.backend=\"inprocess\"", "model.name=\"cnv-w1a1\""]


@pytest.fixture(scope="module")
def cnv_build(tmp_path_factory, cifar10):
    """A run config (cnv-w1a1) and a build of its initial global model: compile once, for every round."""
    if finn_missing is not None:
        pytest.skip(f"finn-plus not importable: {finn_missing}")
    from export import to_qonnx
    from training.config import load_config
    from training.task import make_model

    tmp = tmp_path_factory.mktemp("cnv")
    cfg = load_config(None, [*FED, f"run.out_dir=\"{tmp}\"", "run.name=\"fed\""])
    to_qonnx(make_model(cfg), tmp / "round_000.onnx")
    t0 = time.time()
    build = light_build(tmp / "round_000.onnx", tmp / "build")
    print(f"\nlight build of cnv-w1a1: {time.time() - t0:.1f} s")
    return cfg, build, tmp


@needs_finn
def test_batched_engine_equals_finn_and_codec_reads_finns_files(cnv_build, cifar10):
    from finn.core.onnx_exec import execute_onnx

    from client_pynq.dataflow import DataflowModel, DatCodec, find_folded_model
    from finn.util.verification import despecialize_model

    _, build, tmp = cnv_build
    df = DataflowModel(find_folded_model(build))
    assert df.fallback_nodes == []
    ref = despecialize_model(df.model)
    x = cifar10.test_x[:3]
    os.environ["SANITIZE_QUANT_TENSORS"] = "0"
    mine = df.run(x, keep_all=True)
    for i in range(len(x)):
        full = execute_onnx(ref, {ref.graph.input[0].name: x[i : i + 1].astype(np.float32)},
                            return_full_exec_context=True)
        common = [k for k in mine if k in full]
        assert len(common) >= 25
        for k in common:
            assert np.array_equal(np.asarray(full[k]).reshape(mine[k][i : i + 1].shape), mine[k][i : i + 1]), k
    files = sorted((build / "driver" / "runtime_weights").glob("*.dat"))
    codec = DatCodec(build / "driver" / "runtime_weights")  # the layout the build measured with FINN
    codec.check(df)
    assert codec.files == [f.name for f in files]
    for f in files:
        layer, w = codec.decode(f.name, f.read_bytes())
        assert np.array_equal(w, df.get_param(layer)), f.name


@needs_finn
def test_federated_run_with_emulated_boards(cnv_build, cifar10):
    """3 rounds of cnv-w1a1 with ``[hardware] boards`` set: after each round the server sends the
    round's runtime weights to two bit-exact emulated boards (and the QONNX model to a fast-mode
    one, and tries a board that is not there) and logs their replies in the round's JSON line.
    On-device accuracy == the server's accuracy of the same model on the same images, every round."""
    from training.compress import message_to_model
    from training.config import load_config
    from training.data import normalize
    from training.recorder import read_metrics
    from fedfinn.boards import write_board_report
    from fedfinn.rounds import host_accuracy, observers_for
    from training.runner import run
    from training.task import make_model, test_data

    _, build, tmp = cnv_build
    (tmp / "token").write_text("s3cret\n")
    tok = ["--token-file", str(tmp / "token")]
    agents = [AgentProcess(["--emulate", str(build), *tok], tmp, "bitexact-a"),
              AgentProcess(["--emulate", str(build), *tok], tmp, "bitexact-b"),
              AgentProcess(["--emulate", str(build), "--mode", "fast", "--threads", "1", *tok], tmp, "fast")]
    with socket.socket() as s:  # a port nobody listens on: the unreachable board
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    try:
        boards = [a.address for a in agents] + [dead]  # (waits for the agents)
        cfg = load_config(None, [*FED, f"run.out_dir=\"{tmp}\"", "run.name=\"fed_boards\"",
                                 f"hardware.boards={json.dumps(boards)}", f"hardware.build=\"{build}\"",
                                 f"hardware.token_file=\"{tmp / 'token'}\"", "hardware.images=0",
                                 "hardware.timeout=60.0"])
        t0 = time.time()
        rows = read_metrics(run(cfg, progress=False, observers=observers_for(cfg)))
        wall = time.time() - t0
        # image by image on the last round's model: a bit-exact board's predictions are the host's argmax
        x_test, y_test = test_data(cfg)
        model = make_model(cfg)
        message_to_model(model, (cfg.run_dir / "checkpoints" / "round_003.ffnc").read_bytes())
        last = measure_round(boards[:1], model, images=x_test, labels=y_test, build=build, token="s3cret",
                             predictions=True, workdir=tmp / "last")[0]
        half = measure_round(boards[1:2], model, images=x_test[:50], labels=y_test[:50], build=build,
                             token="s3cret", workdir=tmp / "half")[0]
        assert half["accuracy"] == host_accuracy(cfg, model, x_test[:50], y_test[:50])
    finally:
        for a in agents:
            a.stop()
    assert [r["round"] for r in rows] == [1, 2, 3]
    report = []
    for row in rows:
        a, b, fast, gone = row["boards"]  # logged in the round's JSON line
        assert a["ok"] and b["ok"] and fast["ok"], row["boards"]
        assert not gone["ok"] and gone["stage"] == "hello" and gone["error"]  # logged; training went on
        assert a["bit_exact"] and b["bit_exact"] and not fast["bit_exact"] and "not bit-exact" in fast["mode"]
        assert a["images"] == b["images"] == len(y_test) == 100
        # the must-show: on-device accuracy == the host's accuracy of the same quantized model, same images
        host_acc = row["test_accuracy"]
        assert row["boards_host_accuracy"] == host_acc
        assert a["accuracy"] == host_acc and b["accuracy"] == host_acc, (row["round"], host_acc, a, b)
        assert abs(fast["accuracy"] - host_acc) <= 0.1
        assert a["testset_uploaded"] == (row["round"] == 1)
        report.append(f"round {row['round']}: host {host_acc:.3f} | board A {a['accuracy']:.3f} B "
                      f"{b['accuracy']:.3f} (weights {a['seconds_weights']:.2f} s + eval {a['seconds_evaluate']:.2f}"
                      f" s, {a['images_per_s']:.0f} img/s; host hw-weights {a.get('seconds_host_hw_weights')} s) | "
                      f"fast {fast['accuracy']:.3f} ({fast['images_per_s']:.0f} img/s) | boards {row['seconds_boards']} s")
    import torch

    with torch.no_grad():
        logits = model.eval()(normalize(x_test, cifar10.mean, cifar10.std)).numpy()
    srt = np.sort(logits, 1)
    untied = srt[:, -1] > srt[:, -2] + 1e-6 * np.abs(srt[:, -1])
    assert untied.sum() >= 0.9 * len(untied)
    assert np.array_equal(np.asarray(last["predictions"])[untied], logits.argmax(1)[untied])
    # fedfinn report: the on-device table, CSV and plot
    paths = write_board_report([cfg.run_dir], tmp)
    assert "board acc" in paths["boards_markdown"].read_text()
    assert len(paths["boards_csv"].read_text().splitlines()) == 1 + 3 * 4
    assert paths["boards_plot_fed_boards"].stat().st_size > 1000
    assert (cfg.run_dir / "config.toml").read_text().count("127.0.0.1") == 4
    print("\n" + "\n".join(report) + f"\nrun wall time {wall:.1f} s")


# ----------------------------------------------------------------------------- attacker review: the emulators


def _hostile_models() -> dict[str, bytes]:
    """The issue's two: a 399-byte-class model whose constant folding allocates 2^28 floats, and a
    node whose domain names a module to import (``this`` prints on import)."""
    from onnx import TensorProto, helper

    bomb = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "bomb", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [2**28])])
    imp = helper.make_graph(
        [helper.make_node("Anything", ["x"], ["y"], domain="this")], "import",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [helper.make_tensor("x", TensorProto.FLOAT, [1], [1.0])])
    return {name: helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("this", 1)]
                                    ).SerializeToString() for name, g in (("bomb", bomb), ("import", imp))}


@needs_finn
def test_fast_emulator_runs_only_its_builds_graph_and_takes_checked_values(cnv_build, tmp_path):
    """Finding 1: the fast emulator's graph is the build's own input-stage model (one copy of the
    input stage: hw's step_preprocess_io); a peer - even one with the token - sends values, never a
    graph: hostile ONNX is refused unread, and values are held against the build's names, dtype,
    shapes and finiteness before anything runs. The host makes exactly what it accepts."""
    import psutil
    import onnx
    import torch

    from client_pynq.backends import FastEmulator
    from client_pynq.buildfiles import find_step_model
    from client_pynq.fastonnx import round_values
    from export import to_qonnx
    from fedfinn.boards import RoundWeights
    from hw.build import find_intermediate
    from training.task import make_model

    cfg, build, _ = cnv_build
    sys.modules.pop("this", None)
    fe = FastEmulator(build, threads=1)
    agent = Agent(fe, port=0, token=TOKEN)
    agent.start()
    x = _data(40)
    proc = psutil.Process()
    try:
        with BoardClient(*agent.address, token=TOKEN, timeout=60) as c:
            c.upload_testset(x, np.zeros(40, np.int64))
            before = c.evaluate(predictions=True)["predictions"]
            rss0 = proc.memory_info().rss
            t0 = time.monotonic()
            for blob in _hostile_models().values():
                with pytest.raises(BoardError, match="unsupported"):
                    c.set_weights({"model.onnx": blob}, kind="onnx")
                with pytest.raises(BoardError, match="weights_mismatch"):
                    c.set_weights({"model.onnx": np.frombuffer(blob, np.uint8)}, kind="values")
            assert time.monotonic() - t0 < 5 and proc.memory_info().rss - rss0 < 256 * 2**20
            assert "this" not in sys.modules
            # its graph: the build's own step_preprocess_io model (the one input stage, hw's)
            assert fe.model_path == find_intermediate(build, "step_preprocess_io") == \
                find_step_model(build, "step_preprocess_io")
            assert fe.accepts == ("values",) and "not bit-exact" in fe.mode
            good = round_values(onnx.load(str(fe.model_path)))
            name = max(good, key=lambda k: good[k].size)
            bad = {
                "missing": {k: v for k, v in good.items() if k != name},
                "unknown": {**good, "extra": np.zeros(3, np.float32)},
                "shape": {**good, name: good[name].reshape(-1)},
                "bigger": {**good, name: np.zeros((2,) + good[name].shape, np.float32)},
                "int32": {**good, name: good[name].astype(np.int32)},
                "nan": {**good, name: np.where(np.arange(good[name].size).reshape(good[name].shape) == 7, np.nan,
                                                good[name]).astype(np.float32)},
                "inf": {**good, name: np.full(good[name].shape, np.inf, np.float32)},
            }
            wid = c.hello()["weights"]["id"]
            for what, vals in bad.items():
                with pytest.raises(BoardError, match="weights_mismatch"):
                    c.set_weights(vals, kind="values")
                assert c.hello()["weights"]["id"] == wid, what  # nothing applied
            # a later round's model, made by the host as measure_round makes it
            torch.manual_seed(3)
            model = make_model(cfg)
            with torch.no_grad():
                for prm in model.parameters():
                    prm.add_(torch.randn_like(prm) * 0.1)
            to_qonnx(model, tmp_path / "round_009.onnx")
            rw = RoundWeights(tmp_path / "round_009.onnx", build=build, workdir=tmp_path / "w")
            vals = rw.get("values")
            assert set(vals) == set(good) and all(vals[k].shape == good[k].shape for k in good)
            assert c.set_weights(vals, kind="values", server_round=9)["weights"]["round"] == 9
            after = c.evaluate(predictions=True)["predictions"]
            assert not np.array_equal(before, after)
            assert c.set_weights(good, kind="values")["weights"]["source"] == "values"
            assert np.array_equal(c.evaluate(predictions=True)["predictions"], before)  # the build's values again
        assert agent.stats["weights_mismatch"] == 2 + len(bad) and agent.stats["unsupported"] == 2
    finally:
        agent.shutdown()


@needs_finn
def test_bitexact_emulator_answers_weights_mismatch_for_bad_words(cnv_build):
    """Finding 4, the emulator's path: a .dat word -1 (or > 32 bits) is weights_mismatch."""
    from client_pynq.backends import BackendError, BitExactEmulator

    _, build, _ = cnv_build
    b = BitExactEmulator(build)
    name = b.weight_files[0]
    good = {f: (build / "driver" / "runtime_weights" / f).read_bytes() for f in b.weight_files}
    for bad in (b"-1", b"100000000", b"-0"):
        words = good[name].split()
        words[-1] = bad
        with pytest.raises(BackendError) as e:
            b.set_weights("dat", {**good, name: b"\n".join(words)})
        assert e.value.code == "weights_mismatch", (bad, e.value.message)
    assert b.set_weights("dat", good)["layers"] == len(good)


def test_attack_mix_while_the_host_measures(tmp_path):
    """The short version of bench/agent_attack.py (synthetic backend, a few hundred requests):
    silent, slow-drip, oversized claims, bad tokens, garbage and hostile ONNX (without and with the
    token) from 2 processes x 8 threads while the host measures rounds back to back."""
    out = tmp_path / "attack.json"
    cmd = [sys.executable, str(REPO / "bench" / "agent_attack.py"), "--backend", "synthetic", "--requests", "320",
           "--rounds", "5", "--round-gap", "0.2", "--images", "100", "--procs", "2", "--threads", "8", "--hold", "8",
           "--auth-timeout", "2", "--read-timeout", "2", "--max-pending", "8", "--out", str(out)]
    t0 = time.time()
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.read_text())
    a, h, m = res["attack"], res["host"], res["agent_memory"]
    print(f"\n{out.with_suffix('.md').read_text()}\n(test wall time {time.time() - t0:.1f} s)")
    assert a["requests"] >= 320 and set(a["by_kind"]) == {"silent", "slow_drip", "oversized", "bad_token", "garbage",
                                                        "hostile_onnx", "hostile_insider"}
    assert h["completed"] == h["rounds"] >= 5 and h["equal_to_quiet"] == h["rounds"]
    assert h["attack_done_before_host_end"] and res["agent"]["alive_after"]
    oc = a["outcomes"]
    assert set(oc["silent"]) == {"closed"} and a["seconds_max"]["silent"] < 2 + 1.5  # evicted, or the auth deadline
    assert not any(k.startswith(("completed", "still_open")) for k in oc["slow_drip"])
    assert set(oc["oversized"]) <= {"unauthorized", "too_large"}
    assert set(oc["bad_token"]) == {"unauthorized"}
    assert set(oc["hostile_onnx"]) <= {"unauthorized", "reset", "closed"}  # closed: evicted from the strangers' pool
    assert set(oc["hostile_insider"]) == {"unsupported"}  # the synthetic agent takes 'dat' only
    assert m["rss_peak_under_attack_mib"] < m["rss_quiet_peak_mib"] + 128
    assert res["agent"]["stats"]["auth_failed"] >= a["by_kind"]["bad_token"] + a["by_kind"]["oversized"]
