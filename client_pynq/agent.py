"""The board agent: serves the protocol of :mod:`client_pynq.protocol` over TCP.

One thread per connection; the accelerator itself is used by one request at a
time (a lock), so a slow or stalled client never blocks the others for longer
than one accelerator request, and never at all while it is still sending.

Who gets in (protocol version 2): a connection is *pending* until its first
message, a HELLO of at most ``MAX_HELLO_META`` bytes with the token, has
arrived (within ``auth_timeout`` of the accept) and passed; only then is it
*authenticated*. Pending connections have a pool of their own
(``max_pending``): a new connection that finds it full evicts the oldest
pending one, so silent or dripping peers without the token can neither hold
the agent nor keep the legitimate host out; they never occupy one of the
``max_connections`` slots of authenticated connections. Before the HELLO has
passed, the agent reads nothing but that HELLO: a first message of any other
type or size is refused from its 24-byte header. Every message has a deadline
of its own (``read_timeout`` plus its length at ``min_rate``), not a timeout
per read.

Robustness: every malformed request gets an ``ERROR`` reply (unless the peer
is gone) and is counted in ``stats`` by error code; the connection is closed
when the stream can no longer be trusted (``close`` in the reply), and the
agent keeps serving. Lengths are checked against the limits before anything
is read; metadata and payloads are parsed defensively (see ``protocol``).

Standard library + numpy; the backend decides what else is imported.
"""

from __future__ import annotations

import itertools
import logging
import socket
import socketserver
import threading
import time
from collections import Counter, OrderedDict

import numpy as np

from . import __version__
from .backends import Backend, BackendError
from .protocol import (
    EVALUATE, FLAG_REPLY, HELLO, REQUEST_TYPES, SET_WEIGHTS, UPLOAD_TESTSET, VERSION,
    ConnectionClosed, Limits, Message, ProtocolError, make_parts, part_array, read_message, send_error,
    send_message, testset_id, token_ok, weights_id,
)

log = logging.getLogger("fedfinn.board")

MAX_BATCH = 1 << 16
WEIGHT_KINDS = ("dat", "values")


class _Server(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 128  # a burst of short connections must not overflow the accept queue

    def __init__(self, addr, agent):
        self.agent = agent
        super().__init__(addr, socketserver.BaseRequestHandler)

    def process_request(self, request, client_address):
        # admission happens here, in the accepting thread, before a thread is started
        conn = self.agent.admit(request, client_address)
        try:
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="board-conn").start()
        except BaseException:  # no thread for it (the caller closes the socket)
            self.agent.forget(conn)
            raise

    def _serve(self, conn):
        try:
            self.agent.handle_connection(conn)
        finally:
            self.shutdown_request(conn.sock)


class _Conn:
    """One accepted connection and where it stands."""

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket, addr):
        self.id = next(self._ids)
        self.sock = sock
        self.addr = addr
        self.accepted = time.monotonic()
        self.authenticated = False
        self.evicted = False

    def evict(self) -> None:
        """Close from another thread: the handler's blocked read returns at once."""
        self.evicted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Agent:
    """A board agent around one :class:`~client_pynq.backends.Backend`."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 limits: Limits | None = None, idle_timeout: float = 300.0, read_timeout: float = 30.0,
                 max_connections: int = 4, exit_after_idle: float = 0.0, auth_timeout: float = 10.0,
                 max_pending: int = 16):
        if max_connections < 1 or max_pending < 1:
            raise ValueError("max_connections and max_pending must be at least 1")
        self.backend = backend
        self.token = token or None
        self.limits = limits or Limits()
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.auth_timeout = auth_timeout
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.exit_after_idle = exit_after_idle
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._lock = threading.Lock()  # the accelerator: one request at a time
        self._conn_lock = threading.Lock()
        self._pending: OrderedDict[int, _Conn] = OrderedDict()  # oldest first
        self._authed: dict[int, _Conn] = {}
        self._last = time.monotonic()
        self.testset: tuple[np.ndarray, np.ndarray, str] | None = None
        self.weights = {"id": "build", "round": None, "source": "deployment package" if backend.has_weights()
                        else None}
        if not backend.has_weights():
            self.weights = {"id": None, "round": None, "source": None}
        self.server = _Server((host, port), self)
        self.started = time.time()

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def serve_forever(self) -> None:
        if self.exit_after_idle:
            threading.Thread(target=self._watchdog, daemon=True, name="idle-exit").start()
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self.server.server_close()

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, embedding)."""
        t = threading.Thread(target=self.serve_forever, daemon=True, name="board-agent")
        t.start()
        return t

    def shutdown(self) -> None:
        self.server.shutdown()
        with self._conn_lock:
            conns = list(self._pending.values()) + list(self._authed.values())
        for c in conns:
            c.evict()

    def _watchdog(self):
        # only authenticated peers count as activity: strangers cannot keep the agent up
        while True:
            time.sleep(min(1.0, self.exit_after_idle / 4))
            if not self._authed and time.monotonic() - self._last > self.exit_after_idle:
                log.info("no request for %.0f s: exiting", self.exit_after_idle)
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    @property
    def connections(self) -> dict:
        """How many connections are pending / authenticated now."""
        with self._conn_lock:
            return {"pending": len(self._pending), "authenticated": len(self._authed)}

    # ------------------------------------------------------------------ connections
    def admit(self, sock: socket.socket, addr) -> _Conn:
        """A new connection joins the pending pool; when that is full, the oldest pending one goes."""
        conn = _Conn(sock, addr)
        victim = None
        with self._conn_lock:
            if len(self._pending) >= self.max_pending:
                _, victim = self._pending.popitem(last=False)
            self._pending[conn.id] = conn
        self.count("connections")
        if victim is not None:
            self.count("evicted")
            victim.evict()
        return conn

    def forget(self, conn: _Conn) -> None:
        with self._conn_lock:
            self._pending.pop(conn.id, None)
            self._authed.pop(conn.id, None)

    def handle_connection(self, conn: _Conn) -> None:
        sock = conn.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            if self._authenticate(conn):
                self._serve_connection(conn)
        finally:
            with self._conn_lock:
                self._pending.pop(conn.id, None)
                was_authed = self._authed.pop(conn.id, None) is not None
            if was_authed:
                self._last = time.monotonic()

    def _authenticate(self, conn: _Conn) -> bool:
        """The first message: a small HELLO with the token, within auth_timeout of the accept."""
        sock = conn.sock
        try:
            msg = read_message(sock, self.limits, deadline=conn.accepted + self.auth_timeout,
                               body_timeout=self.read_timeout, hello_only=True)
        except (ConnectionClosed, OSError) as err:
            if isinstance(err, socket.timeout):
                self.count("auth_timeout")
            elif not conn.evicted and not isinstance(err, ConnectionClosed):
                self.count("socket_errors")
            return False
        except ProtocolError as err:
            if conn.evicted:
                return False
            self.count("errors")
            self.count(err.code)
            self.count("auth_failed")
            log.info("%s (not authenticated): %s", conn.addr[0] if conn.addr else "?", err)
            if err.code != "truncated":
                self._reply_error(sock, err, close=True)
            return False
        if not token_ok(self.token, msg.meta.get("token")):
            self.count("errors")
            self.count("unauthorized")
            self.count("auth_failed")
            self._reply_error(sock, ProtocolError("unauthorized", "missing or wrong token", close=True,
                                                  request_id=msg.request_id), close=True)
            return False
        with self._conn_lock:
            if conn.evicted:
                return False
            self._pending.pop(conn.id, None)
            full = len(self._authed) >= self.max_connections
            if not full:
                self._authed[conn.id] = conn
                conn.authenticated = True
        if full:
            self.count("busy")
            self._reply_error(sock, ProtocolError("busy", f"at most {self.max_connections} authenticated "
                                                  "connections", close=True, request_id=msg.request_id), close=True)
            return False
        self.count("authenticated")
        self._last = time.monotonic()
        self.count("requests")
        self.count("ok")
        return self._send_reply(sock, msg, self.hello(), [])

    def _serve_connection(self, conn: _Conn) -> None:
        sock = conn.sock
        while True:
            try:
                msg = read_message(sock, self.limits, header_timeout=self.idle_timeout,
                                   body_timeout=self.read_timeout)
            except ConnectionClosed:
                return
            except socket.timeout:
                self.count("idle_closed")
                return
            except ProtocolError as err:
                self.count("errors")
                self.count(err.code)
                log.info("%s: %s", conn.addr[0] if conn.addr else "?", err)
                if err.code != "truncated" and not self._reply_error(sock, err):
                    return
                if err.close:
                    return
                continue
            except OSError:
                self.count("socket_errors")
                return
            self._last = time.monotonic()
            self.count("requests")
            try:
                meta, bufs = self.dispatch(msg)
            except ProtocolError as err:
                self.count("errors")
                self.count(err.code)
                err.extra.setdefault("request_id", msg.request_id)
                if not self._reply_error(sock, err) or err.close:
                    return
                continue
            except BackendError as err:
                self.count("errors")
                self.count(err.code)
                log.warning("%s failed: %s", REQUEST_TYPES.get(msg.type), err.message)
                if not self._reply_error(sock, ProtocolError(err.code, err.message, request_id=msg.request_id)):
                    return
                continue
            except Exception as err:  # the backend broke: say so, keep serving
                self.count("errors")
                self.count("backend_error")
                log.exception("%s failed", REQUEST_TYPES.get(msg.type))
                text = f"{type(err).__name__}: {str(err)[:500]}"
                if not self._reply_error(sock, ProtocolError("backend_error", text, request_id=msg.request_id)):
                    return
                continue
            self.count("ok")
            if not self._send_reply(sock, msg, meta, bufs):
                return

    def _send_reply(self, sock, msg: Message, meta: dict, bufs) -> bool:
        try:
            sock.settimeout(self.read_timeout)  # a peer that does not read cannot hold the thread for long
            send_message(sock, msg.type, meta, bufs, flags=FLAG_REPLY, request_id=msg.request_id)
            return True
        except OSError:
            self.count("socket_errors")
            return False

    def _reply_error(self, sock, err: ProtocolError, close: bool | None = None) -> bool:
        extra = dict(err.extra)
        rid = extra.pop("request_id", 0)
        try:
            sock.settimeout(self.read_timeout)
            send_error(sock, err.code, err.message, request_id=rid, close=err.close if close is None else close,
                       **extra)
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------ requests
    def dispatch(self, msg: Message) -> tuple[dict, list]:
        """A request on an authenticated connection (a token it carries anyway must be right)."""
        if "token" in msg.meta and not token_ok(self.token, msg.meta.get("token")):
            raise ProtocolError("unauthorized", "wrong token", close=True, request_id=msg.request_id)
        if msg.type == HELLO:
            return self.hello(), []
        if msg.type == UPLOAD_TESTSET:
            return self.upload_testset(msg), []
        if msg.type == SET_WEIGHTS:
            return self.set_weights(msg), []
        if msg.type == EVALUATE:
            return self.evaluate(msg)
        raise ProtocolError("bad_type", f"unknown message type {msg.type}", request_id=msg.request_id)

    def hello(self) -> dict:
        b = self.backend
        ts = None
        if self.testset is not None:
            ts = {"id": self.testset[2], "images": int(len(self.testset[0]))}
        with self._stats_lock:
            stats = dict(self.stats)
        return {
            "protocol": VERSION, "agent": __version__, "backend": b.info(), "accepts": list(b.accepts),
            "input": {"shape": list(b.input_shape), "dtype": b.input_dtype}, "default_batch": b.default_batch,
            "weight_files": list(b.weight_files), "testset": ts, "weights": dict(self.weights),
            "limits": {**self.limits.as_dict(), "read_timeout_s": self.read_timeout,
                       "idle_timeout_s": self.idle_timeout, "auth_timeout_s": self.auth_timeout,
                       "max_connections": self.max_connections, "max_pending": self.max_pending},
            "token_required": bool(self.token), "stats": stats, "uptime_s": round(time.time() - self.started, 1),
        }

    def upload_testset(self, msg: Message) -> dict:
        rid = msg.request_id
        if set(msg.parts) != {"images", "labels"}:
            raise ProtocolError("bad_request", "UPLOAD_TESTSET needs exactly the parts 'images' and 'labels'",
                                request_id=rid)
        images = part_array(*msg.parts["images"], rid)
        labels = part_array(*msg.parts["labels"], rid)
        b = self.backend
        if images.dtype.name != b.input_dtype or tuple(images.shape[1:]) != tuple(b.input_shape):
            raise ProtocolError("bad_request", f"images must be {b.input_dtype} of shape (n, "
                                f"{', '.join(map(str, b.input_shape))}), got {images.dtype.name} "
                                f"{list(images.shape)}", request_id=rid)
        if labels.ndim != 1 or len(labels) != len(images) or len(images) == 0:
            raise ProtocolError("bad_request", "labels must be 1-D with one label per image (n >= 1)",
                                request_id=rid)
        if labels.dtype.kind not in "iu":
            raise ProtocolError("bad_request", "labels must be integers", request_id=rid)
        images = np.array(images)  # own copies (the payload buffer goes away)
        labels = np.array(labels, dtype=np.int64)
        tid = testset_id(images, labels)
        with self._lock:
            self.testset = (images, labels, tid)
        log.info("test set %s: %d images", tid[:12], len(images))
        return {"testset": {"id": tid, "images": int(len(images))}}

    def set_weights(self, msg: Message) -> dict:
        rid = msg.request_id
        kind = msg.meta.get("kind")
        rnd = msg.meta.get("round")
        if kind not in WEIGHT_KINDS and kind != "onnx":
            raise ProtocolError("bad_request", "kind must be 'dat' or 'values'", request_id=rid)
        if rnd is not None and (not isinstance(rnd, int) or isinstance(rnd, bool)):
            raise ProtocolError("bad_request", "round must be an integer", request_id=rid)
        if kind not in self.backend.accepts:
            raise BackendError("unsupported", f"this agent ({self.backend.kind}) takes {list(self.backend.accepts)}"
                               f" weights, not {kind!r}")
        if not msg.parts:
            raise ProtocolError("bad_request", "no weight files", request_id=rid)
        if kind == "values":  # named float32 arrays (part_array checks dtype, shape and size)
            files = {name: np.array(part_array(desc, buf, rid)) for name, (desc, buf) in msg.parts.items()}
        else:
            files = {name: bytes(buf) for name, (_, buf) in msg.parts.items()}
        t0 = time.perf_counter()
        with self._lock:
            try:
                res = self.backend.set_weights(kind, files) or {}
            except BackendError as err:
                if err.partial:  # EVALUATE answers no_weights until a complete update
                    self.weights = {"id": None, "round": None, "source": "failed update"}
                raise
            wid = weights_id(kind, files)
            self.weights = {"id": wid, "round": rnd, "source": kind}
        dt = time.perf_counter() - t0
        log.info("weights %s (round %s, %d files) in %.2f s", wid[:12], rnd, len(files), dt)
        return {"weights": dict(self.weights), "seconds": round(dt, 4), **res}

    def evaluate(self, msg: Message) -> tuple[dict, list]:
        rid = msg.request_id
        m = msg.meta
        b = self.backend
        bs = m.get("batch_size", b.default_batch)
        limit = m.get("limit")
        want_pred = m.get("predictions", False)
        if not isinstance(bs, int) or isinstance(bs, bool) or not 1 <= bs <= MAX_BATCH:
            raise ProtocolError("bad_request", f"batch_size must be an integer in 1..{MAX_BATCH}", request_id=rid)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ProtocolError("bad_request", "limit must be a positive integer", request_id=rid)
        if not isinstance(want_pred, bool):
            raise ProtocolError("bad_request", "predictions must be true or false", request_id=rid)
        with self._lock:
            if self.testset is None:
                raise BackendError("no_testset", "no test set: send UPLOAD_TESTSET first")
            if not b.has_weights() or self.weights.get("id") is None:
                raise BackendError("no_weights", "no weights: send SET_WEIGHTS first")
            images, labels, tid = self.testset
            n = len(images) if limit is None else min(limit, len(images))
            res, pred = run_evaluation(b, images[:n], labels[:n], bs)
            res.update({"testset_id": tid, "weights_id": self.weights["id"], "round": self.weights["round"]})
        log.info("evaluated %d images: accuracy %.4f, %.1f images/s", n, res["accuracy"], res["images_per_s"])
        if want_pred:
            parts, bufs = make_parts([("predictions", pred.astype(np.int16))])
            res["parts"] = parts
            return res, bufs
        return res, []


def run_evaluation(backend: Backend, images: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[dict, np.ndarray]:
    """Run ``images`` through the backend in batches; the EVALUATE reply's figures."""
    n = len(images)
    pred = np.empty(n, dtype=np.int64)
    lat = []
    mon = backend.power_monitor()
    ctx = mon if mon is not None else _Null()
    with ctx:
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            xb = images[i : i + batch_size]
            t = time.perf_counter()
            out = np.asarray(backend.infer(xb)).reshape(-1)
            lat.append(time.perf_counter() - t)
            if len(out) != len(xb):
                raise BackendError("backend_error", f"{len(out)} outputs for {len(xb)} images")
            pred[i : i + len(xb)] = out
        wall = time.perf_counter() - t0
    correct = int((pred == labels).sum())
    lat_ms = np.asarray(lat) * 1e3
    res = {
        "accuracy": correct / n, "correct": correct, "images": n,
        "images_per_s": round(n / wall, 2) if wall > 0 else None,
        "latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 3),
                       "p99": round(float(np.percentile(lat_ms, 99)), 3),
                       "mean": round(float(lat_ms.mean()), 3)},
        "batch_size": batch_size, "batches": len(lat), "power_w": mon.result() if mon is not None else None,
        "mode": backend.mode, "bit_exact": backend.bit_exact, "seconds": round(wall, 4),
    }
    return res, pred


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
