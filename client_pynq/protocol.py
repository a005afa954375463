"""The board protocol, version 2: length-prefixed binary messages over one TCP connection.

The host (the federated server, :mod:`fedfinn.boards`) talks to a board agent
(:mod:`client_pynq.agent`: a PYNQ board, or the emulator on the host) in
request/reply pairs on a TCP stream. Standard library (``socket``, ``struct``,
``json``, ``hmac``) + numpy only.

Message
-------
Every message, request or reply, is a 24-byte header, then ``meta_len`` bytes
of JSON metadata, then ``payload_len`` bytes of binary payload::

    offset size field        type (network byte order = big-endian)
    0      4    magic        b"FFNB"
    4      1    version      uint8, 2 (this document)
    5      1    type         uint8, message type (below)
    6      2    flags        uint16, bit 0 = REPLY (set on every reply); other bits 0
    8      4    request_id   uint32, chosen by the client, echoed in the reply
    12     4    meta_len     uint32, length of the JSON metadata (0 = no metadata)
    16     8    payload_len  uint64, length of the binary payload
    24     ...  metadata     UTF-8 JSON object
    ...    ...  payload      raw bytes, described by the metadata's ``parts``

Payload parts: the metadata lists what the payload holds as ``parts``, a list
of ``{"name": str, "offset": int, "size": int}`` (plus ``"dtype"`` and
``"shape"`` for arrays: dtype one of :data:`ARRAY_DTYPES`, little-endian,
C order). Parts lie back to back from offset 0 and cover the payload exactly.

Session: HELLO first
--------------------
The first message on every connection must be a ``HELLO`` with no payload and
at most :data:`MAX_HELLO_META` bytes of metadata, and it carries the token
(``"token"``, when the agent has one). The agent checks all of that from the
24-byte header and those few metadata bytes, before it reads or allocates
anything else: any other first message is answered ``unauthorized`` (or
``too_large``) and the connection is closed, its body unread. The whole first
HELLO must arrive within ``auth_timeout`` seconds of the connection's accept.
A HELLO with the right token authenticates the connection; later requests on
it need no token (a ``"token"`` they carry anyway must be right).

Connections: unauthenticated ones (not yet through their HELLO) live in a pool
of their own of at most ``max_pending``; a new connection that finds it full
evicts the oldest (closed, nothing sent). Authenticated connections have
``max_connections`` slots that unauthenticated ones never occupy; an
authenticated connection beyond them gets ``busy``.

Requests (client -> agent) and their replies (same type, REPLY flag):

``HELLO`` (1)
    meta: ``{"token"?, "client"?}``. Reply: ``protocol``, ``agent`` (version),
    ``backend`` (``kind``: board | emulate-bitexact | emulate-fast | synthetic;
    ``mode``: the human-readable label; ``bit_exact``: bool), ``accepts``
    (weight kinds: ``"dat"`` or ``"values"``), ``input`` (``shape`` of one
    image, ``dtype``), ``weight_files`` (names a ``dat`` update must hold),
    ``testset`` (``id``, ``images``; null before an upload), ``weights``
    (``id``, ``round``, ``source``), ``limits``, ``stats`` (request counters).
``UPLOAD_TESTSET`` (2)
    meta: ``{"parts": [images, labels]}``: part ``images`` (uint8 or
    int8, shape ``(n, *input shape)``, already in the accelerator's input format:
    for the fedfinn builds raw CIFAR pixels, NHWC), part ``labels`` (integer, shape
    ``(n,)``). Replaces the agent's test set. Reply: ``testset`` (``id`` =
    :func:`testset_id`, ``images``).
``SET_WEIGHTS`` (3)
    meta: ``{"kind": "dat" | "values", "round"?: int, "parts": [...]}``.
    ``dat``: one part per runtime-weight file, named as FINN's driver generator
    names them (``<partition>_<n>_<layer>.dat``; the bytes exactly as written
    to ``runtime_weights/``), the complete set the agent lists in
    ``weight_files``. ``values`` (the fast emulator only): one float32 array
    part per parameter of the build's input-stage model (``step_preprocess_io``:
    input stage + network + TopK), named as its initializers, with their exact
    shapes: every float32 initializer but the quantizers' bit widths. The
    agent runs only the graph of its own build; an update changes values,
    never the graph (an ONNX model is not accepted). All files / values are
    checked before any is applied. Reply: ``weights`` (``id`` = sha256 of the
    parts, ``round``), ``seconds``.
``EVALUATE`` (4)
    meta: ``{"batch_size"?: int, "limit"?: int, "predictions"?: bool}``.
    Runs the first ``limit`` (default all) test images through the accelerator
    in batches of ``batch_size`` (default: the agent's). Reply: ``accuracy``,
    ``correct``, ``images``, ``images_per_s`` (images / wall time of the batch
    loop), ``latency_ms`` (``p50``, ``p99``, ``mean``: wall time of one
    accelerator call per batch), ``batch_size``, ``batches``, ``power_w``
    (``{"mean", "max", "rails", "samples"}`` from the board's power rails
    during the loop, null where the board exposes none), ``mode``,
    ``bit_exact``, ``seconds``, ``testset_id``, ``weights_id``; with
    ``predictions`` a payload part ``predictions`` (int16, one per image).

Errors: a reply of type ``ERROR`` (255, REPLY flag) with meta ``{"code",
"message", "close"}``; codes in :data:`ERROR_CODES`. ``close`` = the agent
closes the connection after this reply (the stream cannot be trusted: bad
magic or version, a length over the limits, a truncated message, a timeout, a
failed or missing authentication). Otherwise the connection stays usable.

Limits (agent side, configurable; sent in the HELLO reply): metadata at most
:data:`DEFAULT_MAX_META` bytes; payload at most ``max_testset_bytes`` for
UPLOAD_TESTSET, ``max_weights_bytes`` for SET_WEIGHTS, 0 for HELLO and
EVALUATE; at most :data:`MAX_PARTS` parts. A declared length over a limit is
refused from the header alone (nothing more is read). Deadlines are per
message, not per read: once a message's first byte has arrived, all of it must
arrive within ``read_timeout + (meta_len + payload_len) / min_rate`` seconds
(``timeout`` otherwise, however steadily the bytes drip in); the first HELLO
within ``auth_timeout`` of the accept; an authenticated connection silent
between messages is closed after ``idle_timeout`` seconds.

The host bounds what it reads from a board the same way
(:func:`reply_limits`): reply metadata at most :data:`MAX_REPLY_META`, a reply
payload only on EVALUATE (at most ``max_reply_payload``), refused from the
header before anything is allocated.

Token: compared in constant time (``hmac.compare_digest``). It is sent in
clear: on an untrusted network, tunnel the port (ssh -L).

Versioning: a change that old peers cannot follow gets a new ``version``; an
agent answers a version it does not speak with ``bad_version`` (meta
``supported``) and closes. New optional metadata keys do not change the version.
Version 2 (this) against 1: the HELLO-first session (the token travels in the
HELLO only), per-message deadlines, ``float32`` array parts and the ``values``
weight kind in place of ``onnx``; the frame layout is unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import time
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"FFNB"
VERSION = 2
HEADER = struct.Struct("!4sBBHIIQ")
HEADER_SIZE = HEADER.size  # 24

# message types
HELLO = 1
UPLOAD_TESTSET = 2
SET_WEIGHTS = 3
EVALUATE = 4
ERROR = 255
REQUEST_TYPES = {HELLO: "HELLO", UPLOAD_TESTSET: "UPLOAD_TESTSET", SET_WEIGHTS: "SET_WEIGHTS", EVALUATE: "EVALUATE"}

FLAG_REPLY = 0x0001
KNOWN_FLAGS = FLAG_REPLY

DEFAULT_MAX_META = 64 * 1024
DEFAULT_MAX_TESTSET = 256 * 2**20
DEFAULT_MAX_WEIGHTS = 64 * 2**20
DEFAULT_MIN_RATE = 2**20  # bytes/s a message's deadline grants beyond read_timeout
MAX_PARTS = 4096
MAX_NAME = 200
#: metadata of the first HELLO on a connection (read before it is authenticated)
MAX_HELLO_META = 4096
#: what the host reads of a reply: metadata, and the payload of an EVALUATE reply
MAX_REPLY_META = 2**20
DEFAULT_MAX_REPLY_PAYLOAD = 64 * 2**20

ARRAY_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float32")

ERROR_CODES = {
    "bad_magic": "the first 4 bytes are not b'FFNB'",
    "bad_version": "protocol version not spoken by this agent",
    "bad_type": "unknown message type",
    "bad_flags": "unknown flag bits set",
    "too_large": "a declared length is over the agent's limits",
    "truncated": "the peer closed the connection inside a message",
    "timeout": "a message did not arrive completely within its deadline",
    "bad_json": "the metadata is not a UTF-8 JSON object",
    "bad_request": "the request is malformed (fields, parts, shapes, names)",
    "unauthorized": "missing or wrong token, or a first message that is not a HELLO",
    "busy": "too many connections",
    "no_testset": "EVALUATE before UPLOAD_TESTSET",
    "no_weights": "EVALUATE before any weights",
    "weights_mismatch": "the weight files do not fit the accelerator",
    "unsupported": "the backend cannot do this (e.g. the weight kind)",
    "backend_error": "the accelerator or emulator failed",
}


class ProtocolError(Exception):
    """A malformed message. ``close``: the stream is out of step and must be closed."""

    def __init__(self, code: str, message: str, close: bool = False, **extra):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.close = close
        self.extra = extra


class ConnectionClosed(Exception):
    """The peer closed the connection at a message boundary (not an error)."""


@dataclass
class Limits:
    """What a reader accepts. As an agent: requests; as a host (:func:`reply_limits`): replies."""

    max_meta: int = DEFAULT_MAX_META
    max_testset: int = DEFAULT_MAX_TESTSET
    max_weights: int = DEFAULT_MAX_WEIGHTS
    max_reply_payload: int = DEFAULT_MAX_REPLY_PAYLOAD
    min_rate: float = DEFAULT_MIN_RATE

    def max_payload(self, mtype: int, reply: bool = False) -> int:
        if reply:
            return self.max_reply_payload if mtype == EVALUATE else 0
        if mtype == UPLOAD_TESTSET:
            return self.max_testset
        if mtype == SET_WEIGHTS:
            return self.max_weights
        return 0

    def as_dict(self) -> dict:
        return {"max_meta_bytes": self.max_meta, "max_testset_bytes": self.max_testset,
                "max_weights_bytes": self.max_weights, "max_parts": MAX_PARTS,
                "max_hello_meta_bytes": MAX_HELLO_META, "min_rate_bytes_per_s": self.min_rate}


def reply_limits(max_reply_payload: int = DEFAULT_MAX_REPLY_PAYLOAD) -> Limits:
    """The host's bounds on a board's replies."""
    return Limits(max_meta=MAX_REPLY_META, max_testset=0, max_weights=0, max_reply_payload=max_reply_payload)


@dataclass
class Message:
    type: int
    flags: int
    request_id: int
    meta: dict
    payload: bytes | bytearray | memoryview = b""
    parts: dict = field(default_factory=dict)  # name -> (part meta, memoryview)


# ----------------------------------------------------------------------------- sending


def encode_meta(meta: dict | None) -> bytes:
    if not meta:
        return b""
    return json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")


def make_parts(items: list[tuple[str, bytes | bytearray | memoryview | np.ndarray]]) -> tuple[list[dict], list]:
    """Part descriptors and the buffers to send, back to back."""
    parts, bufs, off = [], [], 0
    for name, data in items:
        d: dict = {"name": name, "offset": off}
        if isinstance(data, np.ndarray):
            arr = data if data.flags.c_contiguous else np.ascontiguousarray(data)  # keeps 0-d arrays 0-d
            dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            arr = arr.astype(dt, copy=False)
            if arr.dtype.name not in ARRAY_DTYPES:
                raise ValueError(f"part {name}: dtype {arr.dtype} not one of {ARRAY_DTYPES}")
            d["dtype"] = arr.dtype.name
            d["shape"] = list(arr.shape)
            buf = memoryview(arr).cast("B")
        else:
            buf = memoryview(data).cast("B")
        d["size"] = buf.nbytes
        off += buf.nbytes
        parts.append(d)
        bufs.append(buf)
    return parts, bufs


def send_message(sock: socket.socket, mtype: int, meta: dict | None = None, payload=(), flags: int = 0,
                 request_id: int = 0) -> int:
    """Send one message; ``payload`` is bytes or a list of buffers (sent back to back)."""
    mb = encode_meta(meta)
    bufs = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    plen = sum(memoryview(b).nbytes for b in bufs)
    head = HEADER.pack(MAGIC, VERSION, mtype, flags, request_id & 0xFFFFFFFF, len(mb), plen)
    if plen <= 1 << 16:  # small: one write (no Nagle/delayed-ACK stall between header and payload)
        sock.sendall(b"".join([head, mb, *[bytes(memoryview(b)) for b in bufs]]))
    else:
        sock.sendall(head + mb)
        for b in bufs:
            if memoryview(b).nbytes:
                sock.sendall(b)
    return HEADER_SIZE + len(mb) + plen


def send_error(sock: socket.socket, code: str, message: str, request_id: int = 0, close: bool = False,
               **extra) -> None:
    meta = {"code": code, "message": message, "close": close, **extra}
    send_message(sock, ERROR, meta, flags=FLAG_REPLY, request_id=request_id)


# ----------------------------------------------------------------------------- receiving


def recv_exact(sock: socket.socket, n: int, into: bytearray | None = None, at_boundary: bool = False,
               deadline: float | None = None) -> bytearray:
    """Read exactly ``n`` bytes. EOF before the first byte with ``at_boundary``:
    :class:`ConnectionClosed`; EOF anywhere else: ``ProtocolError('truncated')``.
    ``deadline`` (``time.monotonic()``): all ``n`` bytes by then, however they trickle
    in (``ProtocolError('timeout')``; ``socket.timeout`` before the first byte with
    ``at_boundary``); None: the socket's own timeout, per read."""
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("deadline")
                sock.settimeout(min(left, 86400.0))  # (a far deadline must not overflow the OS timeout)
            k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        except socket.timeout:
            if at_boundary and got == 0:
                raise
            raise ProtocolError("timeout", f"message incomplete at its deadline ({got} of {n} bytes)",
                                close=True) from None
        except ConnectionResetError:  # the peer vanished (RST, not FIN): the same as a close
            k = 0
        if k == 0:
            if at_boundary and got == 0:
                raise ConnectionClosed()
            raise ProtocolError("truncated", f"connection closed after {got} of {n} bytes", close=True)
        got += k
    return buf


def parse_header(raw: bytes | bytearray) -> tuple[int, int, int, int, int, int]:
    """(version, type, flags, request_id, meta_len, payload_len); raises ProtocolError."""
    magic, version, mtype, flags, rid, mlen, plen = HEADER.unpack(bytes(raw))
    if magic != MAGIC:
        raise ProtocolError("bad_magic", f"bad magic {magic!r} (expected {MAGIC!r})", close=True)
    if version != VERSION:
        raise ProtocolError("bad_version", f"protocol version {version}, this agent speaks {VERSION}", close=True,
                            supported=[VERSION])
    return version, mtype, flags, rid, mlen, plen


def read_message(sock: socket.socket, limits: Limits | None = None, *, reply: bool = False,
                 header_timeout: float | None = None, body_timeout: float | None = None,
                 deadline: float | None = None, hello_only: bool = False) -> Message:
    """Read one message; the header is checked before anything else is read or allocated.

    As an agent (``reply=False``) the type and the lengths are checked against
    ``limits``; as a host (``reply=True``) against what a reply of that type may
    hold (:func:`reply_limits`). ``hello_only``: the first message of a connection,
    not yet authenticated: a HELLO without payload and with at most
    :data:`MAX_HELLO_META` bytes of metadata, or nothing more is read.

    Deadlines (seconds, ``time.monotonic()``): the first byte within
    ``header_timeout``; from there the whole message within ``body_timeout +
    (meta_len + payload_len) / limits.min_rate``; ``deadline`` bounds both. With
    none of them, the socket's own timeout applies to each read.
    """
    limits = limits or Limits()
    now = time.monotonic()
    first_by = _earliest(now + header_timeout if header_timeout is not None else None, deadline)
    first = recv_exact(sock, 1, at_boundary=True, deadline=first_by)
    t0 = time.monotonic()
    msg_by = _earliest(t0 + body_timeout if body_timeout is not None else None, deadline)
    rest = recv_exact(sock, HEADER_SIZE - 1, deadline=msg_by)
    _, mtype, flags, rid, mlen, plen = parse_header(bytes(first) + bytes(rest))
    if hello_only:
        if mtype != HELLO:
            raise ProtocolError("unauthorized", "the first message on a connection must be a HELLO with the token",
                                close=True, request_id=rid)
        if plen or mlen > MAX_HELLO_META:
            raise ProtocolError("too_large", f"a first HELLO holds no payload and at most {MAX_HELLO_META} bytes "
                                "of metadata", close=True, request_id=rid)
    if mlen > limits.max_meta:
        raise ProtocolError("too_large", f"metadata of {mlen} bytes, limit {limits.max_meta}", close=True)
    if reply:
        if mtype != ERROR and mtype not in REQUEST_TYPES:
            raise ProtocolError("bad_type", f"unknown reply type {mtype}", close=True, request_id=rid)
        if plen > limits.max_payload(mtype, reply=True):
            raise ProtocolError("too_large", f"reply payload of {plen} bytes, limit "
                                f"{limits.max_payload(mtype, reply=True)}", close=True, request_id=rid)
    else:
        if mtype not in REQUEST_TYPES:
            # the lengths are still trusted (within limits): skip the body, keep the stream
            if plen > max(limits.max_testset, limits.max_weights):
                raise ProtocolError("too_large", f"payload of {plen} bytes", close=True)
            _discard(sock, mlen + plen, _deadline(msg_by, t0, body_timeout, mlen + plen, limits, deadline))
            raise ProtocolError("bad_type", f"unknown message type {mtype}", request_id=rid)
        if plen > limits.max_payload(mtype):
            raise ProtocolError("too_large", f"{REQUEST_TYPES[mtype]} payload of {plen} bytes, limit "
                                f"{limits.max_payload(mtype)}", close=True, request_id=rid)
    msg_by = _deadline(msg_by, t0, body_timeout, mlen + plen, limits, deadline)
    meta_raw = recv_exact(sock, mlen, deadline=msg_by) if mlen else b""
    payload = recv_exact(sock, plen, deadline=msg_by) if plen else bytearray()
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError("bad_flags", f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:04x}", request_id=rid)
    if not reply and flags & FLAG_REPLY:
        raise ProtocolError("bad_flags", "a request must not carry the REPLY flag", request_id=rid)
    meta = decode_meta(meta_raw, rid)
    msg = Message(mtype, flags, rid, meta, payload)
    if "parts" in meta:
        msg.parts = split_parts(meta["parts"], payload, rid)
    elif plen:
        raise ProtocolError("bad_request", "a payload without 'parts' in the metadata", request_id=rid)
    return msg


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else (a if b is None else min(a, b))


def _deadline(msg_by, t0, body_timeout, nbytes, limits: Limits, deadline) -> float | None:
    """The message's deadline once its lengths are known: more bytes, more time (at ``min_rate``)."""
    if body_timeout is None:
        return msg_by
    rate = limits.min_rate if limits.min_rate and limits.min_rate > 0 else None
    return _earliest(t0 + body_timeout + (nbytes / rate if rate else 0.0), deadline)


def _discard(sock: socket.socket, n: int, deadline: float | None = None) -> None:
    buf = bytearray(min(n, 1 << 16))
    while n > 0:
        k = min(n, len(buf))
        recv_exact(sock, k, into=buf, deadline=deadline)
        n -= k


def decode_meta(raw: bytes | bytearray, rid: int = 0) -> dict:
    if not raw:
        return {}
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ProtocolError("bad_json", f"metadata is not JSON: {str(err)[:120]}", request_id=rid) from None
    if not isinstance(meta, dict):
        raise ProtocolError("bad_json", "metadata must be a JSON object", request_id=rid)
    return meta


def split_parts(parts, payload, rid: int = 0) -> dict:
    """Validate the part table against the payload; name -> (descriptor, memoryview)."""
    bad = lambda why: ProtocolError("bad_request", f"parts: {why}", request_id=rid)  # noqa: E731
    if not isinstance(parts, list) or len(parts) > MAX_PARTS:
        raise bad(f"must be a list of at most {MAX_PARTS} entries")
    view = memoryview(payload)
    out, off = {}, 0
    for p in parts:
        if not isinstance(p, dict):
            raise bad("each part must be an object")
        name, o, size = p.get("name"), p.get("offset"), p.get("size")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise bad("a part needs a name of 1..200 characters")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (o, size)) or o != off or size < 0:
            raise bad(f"part {name!r}: offsets must be back to back from 0")
        if name in out:
            raise bad(f"part {name!r} twice")
        off += size
        if off > len(view):
            raise bad(f"part {name!r} runs past the payload")
        out[name] = (p, view[o : o + size])
    if off != len(view):
        raise bad(f"parts cover {off} of {len(view)} payload bytes")
    return out


def part_array(desc: dict, buf: memoryview, rid: int = 0) -> np.ndarray:
    """The numpy array of a part (read-only view, no copy)."""
    dt, shape = desc.get("dtype"), desc.get("shape")
    name = desc.get("name")
    if dt not in ARRAY_DTYPES:
        raise ProtocolError("bad_request", f"part {name!r}: dtype must be one of {ARRAY_DTYPES}", request_id=rid)
    if not isinstance(shape, list) or not 0 <= len(shape) <= 8 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
        raise ProtocolError("bad_request", f"part {name!r}: bad shape", request_id=rid)
    dtype = np.dtype(dt).newbyteorder("<")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != buf.nbytes:
        raise ProtocolError("bad_request", f"part {name!r}: shape {shape} x {dt} != {buf.nbytes} bytes",
                            request_id=rid)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# ----------------------------------------------------------------------------- helpers


def token_ok(expected: str | None, given) -> bool:
    """Constant-time comparison; no token configured = every request passes."""
    if not expected:
        return True
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def testset_id(images: np.ndarray, labels: np.ndarray) -> str:
    """Identity of a test set: sha256 over dtype, shape and bytes of both arrays."""
    h = hashlib.sha256()
    for a in (images, labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{tuple(a.shape)}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:32]


def weights_id(kind: str, files: dict[str, bytes]) -> str:
    h = hashlib.sha256(kind.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:32]


def safe_file_name(name: str) -> bool:
    """A plain file name: letters, digits, '_', '-', '.', no path, not hidden."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}", name)) and ".." not in name
