"""Host side of the boards: talk to board agents, measure each round's model on them.

* :class:`BoardClient` - one agent: ``hello``, ``upload_testset``,
  ``set_weights``, ``evaluate`` (raises :class:`BoardError` on an error reply).
* :func:`measure_round` - what the federated server calls after a round:
  prepares the round's weights once (runtime-weight files for boards and the
  bit-exact emulator; for fast emulators the parameter values of the build's
  input-stage model, :func:`input_stage_values`), then for every board
  in parallel: upload the test set if the board does not hold it yet, send the
  weights, evaluate. Never raises: a board that is unreachable or fails gets an
  entry with ``ok: false``, the ``stage`` that failed and the ``error``.
* :func:`summarize` / :func:`plot` - per-round on-device figures from a run's
  metrics rows (for ``fedfinn report``).

The host side of :mod:`client_pynq`'s protocol: the agent on the board imports
nothing of this project, this module may import all of it. finn-plus (``hw``)
is optional (``make install-hw``), so it is imported where weight files are
made, not at module top.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from client_pynq.fastonnx import round_values
from client_pynq.protocol import (
    ERROR, EVALUATE, FLAG_REPLY, HELLO, SET_WEIGHTS, UPLOAD_TESTSET, ConnectionClosed, ProtocolError, make_parts,
    part_array, read_message, reply_limits, send_message, testset_id,
)
from export.qonnx_export import to_qonnx
from training.plots import finish, plt
from training.recorder import read_metrics

#: Figures of an EVALUATE reply copied into a round's board entry.
RESULT_FIELDS = ("accuracy", "correct", "images", "images_per_s", "batch_size", "batches", "mode", "bit_exact")


class BoardError(Exception):
    """An error reply (``code`` from protocol.ERROR_CODES) or a failed connection (``code`` = "connection")."""

    def __init__(self, code: str, message: str, board: str = ""):
        super().__init__(f"{board + ': ' if board else ''}{code}: {message}")
        self.code = code
        self.message = message
        self.board = board


def parse_address(addr: str, default_port: int = 9100) -> tuple[str, int]:
    addr = addr.strip()
    if addr.startswith("["):  # [v6]:port
        host, _, rest = addr[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    return host, int(port)


class BoardClient:
    """A connection to one board agent (reconnects once if a kept connection went stale).

    Every new connection starts with the HELLO that carries the token (protocol
    version 2); later requests carry none. What the host reads back is bounded
    (:func:`client_pynq.protocol.reply_limits`): reply metadata at most 1 MiB, a
    payload only on EVALUATE (``max_reply_payload``), both refused from the
    header before anything is allocated; a reply must arrive within ``timeout``
    (first byte) plus its length at the protocol's minimum rate. Whatever a
    board sends, the caller sees :class:`BoardError`."""

    #: a connection closed before the first HELLO's reply (e.g. evicted from the agent's
    #: pool of unauthenticated connections under a flood): tried again this often
    HANDSHAKE_TRIES = 4

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, max_reply_payload: int | None = None):
        self.host, self.port = host, int(port)
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.limits = reply_limits(max_reply_payload) if max_reply_payload is not None else reply_limits()
        self._sock: socket.socket | None = None
        self._rid = 0
        self._lock = threading.Lock()
        self._hello: dict | None = None  # the reply to this connection's first HELLO, until used
        self.bytes_sent = 0

    @classmethod
    def from_address(cls, addr: str, **kw) -> "BoardClient":
        host, port = parse_address(addr)
        return cls(host, port, **kw)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._hello = None
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _exchange(self, sock: socket.socket, mtype: int, meta: dict, bufs=()):
        """One request and its reply on ``sock``: (Message, request id); raises BoardError."""
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        sock.settimeout(self.timeout)
        self.bytes_sent += send_message(sock, mtype, meta, bufs, request_id=self._rid)
        return read_message(sock, self.limits, reply=True, header_timeout=self.timeout,
                            body_timeout=self.timeout), self._rid

    def _connect(self) -> socket.socket:
        """A new connection, authenticated by its first HELLO."""
        meta = {"client": "fedfinn-host"}
        if self.token:
            meta["token"] = self.token
        for attempt in range(self.HANDSHAKE_TRIES):
            try:
                s = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError as err:
                raise BoardError("connection", f"cannot connect: {err}", self.address) from None
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reply, rid = self._exchange(s, HELLO, meta)
            except (ConnectionClosed, ProtocolError, OSError) as err:
                s.close()
                if isinstance(err, ProtocolError) and err.code not in ("truncated",) or \
                        isinstance(err, socket.timeout) or attempt == self.HANDSHAKE_TRIES - 1:
                    raise _as_board_error(err, self) from None
                time.sleep(0.02 * 2**attempt)
                continue
            except (MemoryError, OverflowError, ValueError) as err:  # never a raw error from a board's bytes
                s.close()
                raise BoardError("connection", f"bad reply: {type(err).__name__}", self.address) from None
            if reply.type == ERROR:
                s.close()
                m = reply.meta
                raise BoardError(str(m.get("code", "error")), str(m.get("message", "")), self.address)
            if reply.type != HELLO or not reply.flags & FLAG_REPLY or reply.request_id != rid:
                s.close()
                raise BoardError("connection", "the agent's first reply is not the HELLO's", self.address)
            self._sock, self._hello = s, reply.meta
            return s
        raise AssertionError("unreachable")

    def request(self, mtype: int, meta: dict | None = None, items: list | None = None) -> tuple[dict, dict]:
        """Send one request, return (reply metadata, reply parts as arrays/bytes)."""
        meta = dict(meta or {})
        bufs = []
        if items:
            parts, bufs = make_parts(items)
            meta["parts"] = parts
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                sock = self._sock or self._connect()
                self._hello = None
                try:
                    reply, rid = self._exchange(sock, mtype, meta, bufs)
                except (OSError, ProtocolError, ConnectionClosed) as err:
                    self.close()
                    if attempt == 0 and not fresh and not isinstance(err, (socket.timeout, ProtocolError)):
                        continue  # a kept connection the agent had closed: once more on a new one
                    raise _as_board_error(err, self) from None
                except (MemoryError, OverflowError, ValueError) as err:
                    self.close()
                    raise BoardError("connection", f"bad reply: {type(err).__name__}", self.address) from None
                break
        if reply.type == ERROR:
            m = reply.meta
            if m.get("close"):
                self.close()
            raise BoardError(str(m.get("code", "error")), str(m.get("message", "")), self.address)
        if reply.type != mtype or not reply.flags & FLAG_REPLY or reply.request_id != rid:
            self.close()
            raise BoardError("connection", "reply does not match the request", self.address)
        parts = {}
        try:
            for name, (desc, buf) in reply.parts.items():
                parts[name] = part_array(desc, buf) if "dtype" in desc else bytes(buf)
        except ProtocolError as err:
            raise BoardError("connection", f"bad reply: {err}", self.address) from None
        return reply.meta, parts

    # -- the four requests
    def hello(self) -> dict:
        """The agent's HELLO reply (a new connection's own first HELLO, or a new one)."""
        with self._lock:
            if self._sock is None:
                self._connect()
            if self._hello is not None:
                h, self._hello = self._hello, None
                return h
        return self.request(HELLO, {"client": "fedfinn-host"})[0]

    def upload_testset(self, images: np.ndarray, labels: np.ndarray) -> dict:
        return self.request(UPLOAD_TESTSET, {}, [("images", np.ascontiguousarray(images)),
                                                ("labels", np.ascontiguousarray(labels).astype(np.int64))])[0]

    def set_weights(self, files: dict, kind: str = "dat", server_round: int | None = None) -> dict:
        """``files``: ``{name: bytes}`` (``dat``) or ``{name: float32 array}`` (``values``)."""
        meta = {"kind": kind}
        if server_round is not None:
            meta["round"] = int(server_round)
        items = [(n, files[n] if isinstance(files[n], np.ndarray) else bytes(files[n])) for n in sorted(files)]
        return self.request(SET_WEIGHTS, meta, items)[0]

    def evaluate(self, batch_size: int | None = None, limit: int | None = None, predictions: bool = False) -> dict:
        meta: dict = {"predictions": bool(predictions)}
        if batch_size is not None:
            meta["batch_size"] = int(batch_size)
        if limit is not None:
            meta["limit"] = int(limit)
        res, parts = self.request(EVALUATE, meta)
        res.pop("parts", None)
        if "predictions" in parts:
            res["predictions"] = parts["predictions"].astype(np.int64)
        return res


def _as_board_error(err: Exception, client: BoardClient) -> BoardError:
    if isinstance(err, socket.timeout):
        return BoardError("timeout", f"no reply within {client.timeout:g} s", client.address)
    if isinstance(err, ProtocolError):
        return BoardError("connection", f"bad reply: {err}", client.address)
    return BoardError("connection", f"{type(err).__name__}: {err}", client.address)


# ----------------------------------------------------------------------------- weights of a round


def load_weight_files(path: str | os.PathLike) -> dict[str, bytes]:
    """``{name: bytes}`` of the runtime-weight files in ``path`` (or ``path/runtime_weights``)."""
    p = Path(path)
    if (p / "runtime_weights").is_dir():
        p = p / "runtime_weights"
    files = {f.name: f.read_bytes() for f in sorted(p.glob("*.dat"))}
    if not files:
        raise FileNotFoundError(f"{path}: no runtime-weight files (*.dat)")
    return files


def input_stage_values(build: str | os.PathLike, qonnx: str | os.PathLike) -> dict[str, np.ndarray]:
    """What a fast-emulation board takes for the round's QONNX model ``qonnx``: the build's own
    first step (``hw.build.step_preprocess_io`` with the build's configuration, so names and shapes
    are the build's), then :func:`client_pynq.fastonnx.round_values` - the rule the agent holds
    an update against."""
    from hw.build import step_preprocess_io  # finn-plus is optional (make install-hw)
    from hw.weights import load_config
    from qonnx.core.modelwrapper import ModelWrapper

    model = step_preprocess_io(ModelWrapper(str(qonnx)), load_config(build))
    return round_values(model.model)


class RoundWeights:
    """The weights of one round in the forms the boards ask for (made once, on demand).

    ``model``: ``{name: bytes}`` of ``.dat`` files; a folder of them (``hw weights``
    output); a QONNX ``.onnx`` file (the round's export); or a torch model
    (exported to QONNX here). ``dat`` files and ``values`` (fast emulators) from a
    QONNX model need ``build`` (``hw.weights.update_weights``,
    :func:`input_stage_values`)."""

    def __init__(self, model, build: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
                 server_round: int | None = None):
        self.model = model
        self.build = Path(build) if build else None
        self.workdir = Path(workdir) if workdir else None
        self.server_round = server_round
        self._made: dict[str, dict] = {}
        self._errors: dict[str, str] = {}
        self.seconds: dict[str, float] = {}  # host-side steps (export_qonnx, hw_weights)
        self.seconds_kind: dict[str, float] = {}  # time to make each kind
        self._qonnx_path: Path | None = None
        self._tmp = None
        self._lock = threading.Lock()

    def _dir(self) -> Path:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedfinn-round-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir

    def cleanup(self):
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _qonnx(self) -> Path:
        if self._qonnx_path is not None:
            return self._qonnx_path
        m = self.model
        if isinstance(m, (str, os.PathLike)) and str(m).endswith(".onnx"):
            self._qonnx_path = Path(m)
        elif hasattr(m, "state_dict") and hasattr(m, "eval"):
            path = self._dir() / f"round_{self.server_round or 0:03d}.onnx"
            t0 = time.perf_counter()
            to_qonnx(m, path)
            self.seconds["export_qonnx"] = round(time.perf_counter() - t0, 3)
            self._qonnx_path = path
        else:
            raise ValueError("no QONNX model for this round (give a .onnx file or a torch model)")
        return self._qonnx_path

    def get(self, kind: str) -> dict:
        """The files for ``kind`` ("dat": ``{name: bytes}``, "values": ``{name: float32 array}``);
        raises with the reason."""
        with self._lock:
            if kind in self._made:
                return self._made[kind]
            if kind in self._errors:
                raise RuntimeError(self._errors[kind])
            t0 = time.perf_counter()
            try:
                files = self._make(kind)
            except Exception as err:
                self._errors[kind] = f"{type(err).__name__}: {err}"
                raise RuntimeError(self._errors[kind]) from None
            self._made[kind] = files
            self.seconds_kind[kind] = round(time.perf_counter() - t0, 3)
            return files

    def _make(self, kind: str) -> dict:
        m = self.model
        if kind == "dat":
            if isinstance(m, dict):
                return {str(k): bytes(v) for k, v in m.items()}
            if isinstance(m, (str, os.PathLike)) and Path(m).is_dir():
                return load_weight_files(m)
            if self.build is None:
                raise ValueError("runtime-weight files from a model need the hardware build (build=...)")
            from hw.weights import update_weights  # finn-plus is optional (make install-hw)

            qonnx = self._qonnx()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # FINN's transformations print progress
                res = update_weights(self.build, qonnx, self._dir() / "weights")
            self.seconds["hw_weights"] = round(time.perf_counter() - t0, 3)
            return load_weight_files(res["out_dir"])
        if kind == "values":
            if isinstance(m, dict) or (isinstance(m, (str, os.PathLike)) and Path(m).is_dir()):
                raise ValueError("a fast-emulation board needs the round's model (QONNX or torch), not weight files")
            if self.build is None:
                raise ValueError("a fast-emulation board's values are named after the build's model: give build=...")
            qonnx = self._qonnx()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                values = input_stage_values(self.build, qonnx)
            self.seconds["input_stage"] = round(time.perf_counter() - t0, 3)
            return values
        raise ValueError(f"unknown weight kind {kind!r}")


# ----------------------------------------------------------------------------- one round on every board


def _board_spec(b, token, timeout) -> BoardClient:
    if isinstance(b, BoardClient):
        return b
    if isinstance(b, dict):
        return BoardClient.from_address(b["address"], token=b.get("token", token), timeout=b.get("timeout", timeout))
    return BoardClient.from_address(str(b), token=token, timeout=timeout)


def _hello(client: BoardClient, images: np.ndarray) -> tuple[dict, str]:
    """HELLO and the weight kind to send; raises BoardError."""
    hello = client.hello()
    accepts = hello.get("accepts") or []
    kind = "dat" if "dat" in accepts else ("values" if "values" in accepts else None)
    if kind is None:
        raise BoardError("unsupported", f"the board accepts no weight kind we can make ({accepts})")
    inp = hello.get("input", {})
    if list(inp.get("shape", [])) != list(images.shape[1:]) or inp.get("dtype") != images.dtype.name:
        raise BoardError("bad_request", f"the board takes {inp.get('dtype')} images of shape {inp.get('shape')}, "
                         f"the test set is {images.dtype.name} {list(images.shape[1:])}")
    return hello, kind


def measure_board(client: BoardClient, weights: RoundWeights, images: np.ndarray, labels: np.ndarray,
                  tid: str, server_round: int | None = None, batch_size: int | None = None, limit: int | None = None,
                  predictions: bool = False, hello: tuple[dict, str] | None = None) -> dict:
    """One board, one round: (HELLO), upload if needed, SET_WEIGHTS, EVALUATE. Never raises."""
    entry: dict = {"board": client.address, "ok": False, "round": server_round}
    stage = "hello"
    t_all = time.perf_counter()
    try:
        info, kind = hello if hello is not None else _hello(client, images)
        entry["kind"] = info.get("backend", {}).get("kind")
        stage = "prepare"
        files = weights.get(kind)
        if kind in weights.seconds_kind:
            entry["seconds_host_prepare"] = weights.seconds_kind[kind]
        stage = "upload"
        ts = info.get("testset") or {}
        t0 = time.perf_counter()
        uploaded = ts.get("id") != tid
        if uploaded:
            r = client.upload_testset(images, labels)
            if r.get("testset", {}).get("id") != tid:
                raise BoardError("bad_request", "the board's test set id differs from ours after the upload")
        entry["testset_uploaded"] = uploaded
        entry["seconds_upload"] = round(time.perf_counter() - t0, 4)
        stage = "weights"
        t0 = time.perf_counter()
        client.set_weights(files, kind=kind, server_round=server_round)
        entry["seconds_weights"] = round(time.perf_counter() - t0, 4)
        entry["weight_bytes"] = int(sum(v.nbytes if isinstance(v, np.ndarray) else len(v) for v in files.values()))
        stage = "evaluate"
        t0 = time.perf_counter()
        res = client.evaluate(batch_size=batch_size, limit=limit, predictions=predictions)
        entry["seconds_evaluate"] = round(time.perf_counter() - t0, 4)
        for k in RESULT_FIELDS:
            entry[k] = res.get(k)
        lat = res.get("latency_ms") or {}
        entry["latency_ms_p50"], entry["latency_ms_p99"] = lat.get("p50"), lat.get("p99")
        pw = res.get("power_w")
        entry["power_w"] = pw.get("mean") if isinstance(pw, dict) else None
        entry["power_w_max"] = pw.get("max") if isinstance(pw, dict) else None
        entry["seconds_board"] = round(entry["seconds_weights"] + entry["seconds_evaluate"], 4)
        if predictions:
            entry["predictions"] = res.get("predictions")
        entry["ok"] = True
    except BoardError as err:
        entry.update({"stage": stage, "error": f"{err.code}: {err.message}"})
    except Exception as err:  # never raise into the training loop
        entry.update({"stage": stage, "error": f"{type(err).__name__}: {err}"})
    entry["seconds_total"] = round(time.perf_counter() - t_all, 4)
    return entry


def measure_round(boards, model, *, images: np.ndarray, labels: np.ndarray, build=None,
                  server_round: int | None = None, token: str | None = None, batch_size: int | None = None, limit: int | None = None,
                  timeout: float = 300.0, workdir=None, predictions: bool = False, parallel: bool = True,
                  ) -> list[dict]:
    """Measure one round's model on every board; one entry per board, in order. Never raises.

    ``boards``: "host:port" strings, ``{"address", "token"?, "timeout"?}`` dicts or
    :class:`BoardClient` objects (kept connections). ``model``: see
    :class:`RoundWeights`. ``images``/``labels``: the test set in the
    accelerator's input format (uint8 NHWC for the fedfinn builds), uploaded
    to a board only when it does not hold it yet (same id). ``build``: the
    ``fedfinn hw build`` folder, needed to make runtime-weight files from a model.

    Phases: HELLO to every board (parallel); the weights in each kind some board
    asked for, made once here (timed: ``seconds_host_prepare``); then upload /
    SET_WEIGHTS / EVALUATE on every board in parallel.
    """
    boards = list(boards or [])
    if not boards:
        return []
    try:
        images = np.ascontiguousarray(images)
        labels = np.ascontiguousarray(labels).astype(np.int64)
        tid = testset_id(images, labels)
        weights = RoundWeights(model, build=build, workdir=workdir, server_round=server_round)
        clients = [_board_spec(b, token, timeout) for b in boards]
    except Exception as err:
        return [{"board": str(b if not isinstance(b, dict) else b.get("address")), "ok": False, "round": server_round,
                 "stage": "prepare", "error": f"{type(err).__name__}: {err}"} for b in boards]
    own = [not isinstance(b, BoardClient) for b in boards]
    pool = ThreadPoolExecutor(max_workers=len(clients)) if parallel and len(clients) > 1 else None
    mapper = pool.map if pool else map
    try:
        def hello(c):
            t0 = time.perf_counter()
            try:
                return _hello(c, images), None
            except Exception as err:
                code = f"{err.code}: {err.message}" if isinstance(err, BoardError) else f"{type(err).__name__}: {err}"
                return None, {"board": c.address, "ok": False, "round": server_round, "stage": "hello", "error": code,
                              "seconds_total": round(time.perf_counter() - t0, 4)}

        hellos = list(mapper(hello, clients))
        for kind in sorted({h[1] for h, e in hellos if h is not None}):
            try:
                weights.get(kind)  # made once, before the boards are busy
            except Exception:
                pass  # reported per board

        def one(args):
            c, (h, err) = args
            if err is not None:
                return err
            return measure_board(c, weights, images, labels, tid, server_round=server_round, batch_size=batch_size,
                                 limit=limit,
                                 predictions=predictions, hello=h)

        out = list(mapper(one, zip(clients, hellos)))
        for e in out:
            for k, v in weights.seconds.items():
                e[f"seconds_host_{k}"] = v
        return out
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        for c, mine in zip(clients, own):
            if mine:
                c.close()
        weights.cleanup()


# ----------------------------------------------------------------------------- report helpers


def summarize(rows: list[dict], key: str = "boards") -> list[dict]:
    """Flat per-(round, board) records from a run's metrics rows (``row[key]`` = measure_round's list)."""
    out = []
    for row in rows:
        for e in row.get(key) or []:
            out.append({"round": row.get("round"), "board": e.get("board"), "ok": e.get("ok"),
                        "host_accuracy": row.get("boards_host_accuracy", row.get("test_accuracy", row.get("accuracy"))), "board_accuracy": e.get("accuracy"),
                        "images_per_s": e.get("images_per_s"), "latency_ms_p50": e.get("latency_ms_p50"),
                        "power_w": e.get("power_w"), "mode": e.get("mode"), "error": e.get("error")})
    return out


def table(rows: list[dict], key: str = "boards") -> str:
    """A markdown table of on-device accuracy and images/s per round and board."""
    recs = summarize(rows, key)
    if not recs:
        return "(no board measurements)"
    lines = ["| round | board | host acc | board acc | images/s | p50 ms | power W | note |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in recs:
        note = r["error"] or ("" if r["mode"] is None else r["mode"])
        lines.append(f"| {r['round']} | {r['board']} | {f(r['host_accuracy'], '.4f')} | "
                     f"{f(r['board_accuracy'], '.4f')} | {f(r['images_per_s'], '.1f')} | "
                     f"{f(r['latency_ms_p50'], '.2f')} | {f(r['power_w'], '.2f')} | {note} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | os.PathLike, key: str = "boards") -> Path | None:
    """On-device accuracy (and the host's) and images/s per round, one line per board (matplotlib)."""
    recs = [r for r in summarize(rows, key) if r["ok"]]
    if not recs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = sorted({r["round"] for r in recs})
    host = {r["round"]: r["host_accuracy"] for r in recs}
    if any(v is not None for v in host.values()):
        a1.plot(rounds, [host[r] for r in rounds], "k--", label="host (PyTorch)")
    for board in sorted({r["board"] for r in recs}):
        mine = [r for r in recs if r["board"] == board]
        a1.plot([r["round"] for r in mine], [r["board_accuracy"] for r in mine], "o-", label=board)
        a2.plot([r["round"] for r in mine], [r["images_per_s"] for r in mine], "o-", label=board)
    a1.set_xlabel("round")
    a1.set_ylabel("test accuracy")
    a1.legend(fontsize=7)
    a2.set_xlabel("round")
    a2.set_ylabel("images/s on the board")
    a2.legend(fontsize=7)
    return finish(fig, Path(path))


BOARD_COLUMNS = ("run", "round", "board", "ok", "host_accuracy", "board_accuracy", "images_per_s",
                 "latency_ms_p50", "power_w", "mode", "error")


def write_board_report(run_dirs: list[str | os.PathLike], out: Path) -> dict[str, Path]:
    """``boards.md``, ``boards.csv`` and ``boards_<run>.png`` for the runs that measured their rounds on boards."""
    measured = []
    for run_dir in run_dirs:
        rows = read_metrics(Path(run_dir))
        if any(row.get("boards") for row in rows):
            measured.append((Path(run_dir).name, rows))
    if not measured:
        return {}
    paths = {"boards_markdown": out / "boards.md", "boards_csv": out / "boards.csv"}
    paths["boards_markdown"].write_text("".join(f"## {name}\n\n{table(rows)}\n\n" for name, rows in measured))
    with open(paths["boards_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BOARD_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for name, rows in measured:
            w.writerows({"run": name, **rec} for rec in summarize(rows))
    for name, rows in measured:
        png = plot(rows, out / f"boards_{name}.png")
        if png is not None:
            paths[f"boards_plot_{name}"] = png
    return paths
