"""Wire format for fedfinn messages: named tensors, quantized, pruned, zstd-coded.

This module is the one definition of the byte format.  Everything below is
normative: a decoder written from this text alone must accept what
:func:`encode` writes and reject what :func:`decode` rejects.

Format version 1
================

All integers are unsigned and little-endian; ``f32`` is an IEEE-754 binary32
in little-endian byte order.

Frame (20 bytes, then the stored body)
--------------------------------------
======  =====  ==============================================================
offset  type   field
======  =====  ==============================================================
0       4s     magic, the ASCII bytes ``FFNC``
4       u16    version, 1
6       u8     codec: 0 = body stored raw, 1 = body is one zstd frame
7       u8     flags, reserved, must be 0
8       u64    body_len: length of the (uncompressed) body in bytes
16      u32    crc32 of the stored body bytes (zlib/PNG CRC-32, init 0)
20      ...    stored body, running to the end of the blob
======  =====  ==============================================================

codec 0: the stored body is the body; its length must equal ``body_len``.
codec 1: the stored body is exactly one zstd frame, with nothing after it,
whose header declares a content size equal to ``body_len`` and which
inflates to exactly ``body_len`` bytes; it must be strictly shorter than
``body_len`` (the encoder stores raw otherwise).

The CRC covers the stored bytes (for codec 1 the compressed frame), so every
flipped bit in them is caught before anything is decompressed, including
flips in zstd bits that would not change the output.  Decoder order: magic,
version, flags, codec, ``body_len <= max_bytes``, stored length, CRC, then
decompression (output capped at ``body_len``), then the body.

Body
----
``u32 count``, then ``count`` tensor records back to back, then nothing
(bytes left over after the last record are an error).  Record order is the
order of the mapping given to :func:`encode`; :func:`decode` keeps it.

Tensor record
-------------
=================  ==========================================================
field              meaning
=================  ==========================================================
u16 name_len       1..65535
name_len bytes     the name, UTF-8 (strict); names are unique in a message
u8 kind            0 float dense, 1 float sparse, 2 quant dense,
                   3 quant sparse
u8 flags           bit 0 (MASK, quant kinds only): the tensor carries a
                   pruning mask.  Every other bit must be 0.
u8 ndim            0..8 (0 = a scalar, numel 1)
u32 dims[ndim]     the shape, axis 0 first; numel = product of dims
u8 bits            32 for kinds 0 and 1; 1..8 for kinds 2 and 3
-- kinds 2, 3 only --
u8 scale_mode      0 per-tensor: 1 scale, shape ().
                   1 per-output-channel: dims[0] scales, shape (dims[0],),
                   broadcast along axis 0 (needs ndim >= 1).
f32 scales[...]    finite and > 0
-- kinds 1, 3 only --
u8 pos_enc         0 bitmap, 1 varint gaps (see Positions)
u64 kept           number of kept entries, <= numel
u64 pos_len        length of the position bytes
pos_len bytes      the positions
-- all kinds --
u64 payload_len    must equal the exact size given below
payload_len bytes  the payload
=================  ==========================================================

Payloads (n = numel for dense kinds, n = kept for sparse kinds):

* kinds 0, 1: n float32 values, byte-shuffled: byte 0 (the least
  significant byte of the little-endian encoding) of every value, then byte 1
  of every value, then byte 2, then byte 3.  Size 4*n.  Every value must be
  finite (NaN and +-Inf are rejected).  Values are bit-exact, -0.0 included;
  a sparse float tensor omits exactly the entries whose bits are all 0
  (+0.0), so -0.0 is a kept value.
* kinds 2, 3: n codes packed in exactly ``bits`` bits each, no padding
  between entries, ceil(n*bits/8) bytes.  Entry i occupies stream bits
  i*bits .. i*bits+bits-1, least significant bit of the entry first; stream
  bit k is bit (k mod 8) of byte k div 8, where bit 0 is the least
  significant bit of a byte (little-endian bit order).  The unused high bits
  of the last byte must be 0.  The field u is mapped to the code as:

  - bits == 1: u = 0 means code -1, u = 1 means code +1.
  - bits >= 2: offset binary, code = u - 2^(bits-1).  The range is narrow
    and symmetric, code in [-(2^(bits-1)-1), 2^(bits-1)-1], so u = 0 is
    invalid.

Positions (sparse kinds): the flat, row-major (C order) indices of the kept
entries, strictly increasing, each < numel; the i-th payload entry belongs to
the i-th kept index.  Every other entry is 0 (float +0.0, or code 0).

* pos_enc 0, bitmap: ceil(numel/8) bytes; flat index j is kept iff bit
  (j mod 8) of byte (j div 8) is 1 (LSB first).  The unused high bits of the
  last byte must be 0 and the number of 1 bits must equal ``kept``.
* pos_enc 1, varint gaps: ``kept`` unsigned LEB128 varints (7 bits per byte,
  least significant group first, high bit set on every byte but the last)
  filling exactly pos_len bytes.  The first is the first kept index; each
  next one is (index - previous index - 1), so indices are strictly
  increasing by construction.  Varints must be minimal (a multi-byte varint
  does not end in a 0x00 byte) and at most 9 bytes long.

Float kinds decode to float32 ``np.ndarray``; quantized kinds decode to
:class:`QTensor` with int8 codes, whose value is float32(code) times the
float32 scale of its axis-0 slice, rounded once in float32 (as Brevitas's
int * scale), and exactly +0.0 where the mask is False:

* kind 2: every entry is stored; mask is None, or all True when MASK is set.
* kind 3 with MASK: mask is True exactly at the kept positions; pruned
  entries have code 0.  Kept entries may have any valid code, including 0.
* kind 3 without MASK: the omitted entries are code 0 and mask is None (the
  encoder uses this to drop zero codes when that is smaller).  bits == 1
  has no code 0, so a 1-bit kind 3 record must set MASK.

Limits the decoder enforces
---------------------------
* body_len <= ``max_bytes``; the blob is exactly 20 + stored body bytes.
* total numel of all tensors <= 8 * ``max_bytes``, and numel < 2^62.
* with ``expected``: the names equal its keys exactly and every shape equals
  the expected one (checked as each record header is read, before any
  payload is decoded).
* every length field equals the size implied by the header, so nothing is
  allocated that the blob does not pay for (except the zeros of a sparse
  tensor, bounded by the numel limit).

Any violation raises :class:`CodecError` (a ``ValueError``).  Versions
other than 1 are rejected; a change to anything above needs a new version.

Encoder choices (informative: the decoder accepts any valid layout)
-------------------------------------------------------------------
* Layout per tensor: dense, or sparse with a bitmap or varint gaps when
  dropping the zeros can pay (over 1/32 of a float tensor zero, over 1/bits
  of an unmasked code tensor zero; varints only below 1/4 density); the
  candidate with the smallest zstd output (level min(level, 3)) wins.  A
  mask with any False forces a sparse layout; an all-True mask is dense
  with MASK set.
* The body is stored raw when zstd does not make it strictly smaller.
* Byte shuffling is always on: on N(0, 0.05) float32 weights it makes the
  zstd output about 7% smaller than zstd on the plain bytes (6-7% for the
  kept values of pruned tensors); on code payloads it does not apply.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import zstandard

FORMAT_VERSION = 1
MAGIC = b"FFNC"

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "QTensor",
    "encode",
    "decode",
    "decode_values",
    "mib",
]

_FRAME = struct.Struct("<4sHBBQI")  # magic, version, codec, flags, body_len, crc32
_CODEC_RAW, _CODEC_ZSTD = 0, 1
_FLOAT_DENSE, _FLOAT_SPARSE, _QUANT_DENSE, _QUANT_SPARSE = 0, 1, 2, 3
_FLAG_MASK = 0x01
_POS_BITMAP, _POS_VARINT = 0, 1
_SCALE_TENSOR, _SCALE_CHANNEL = 0, 1
_MAX_NDIM = 8
_MAX_VARINT_BYTES = 9  # 63 bits: enough for any index below 2^62, fits uint64
_MAX_NUMEL = 1 << 62
_FLOAT_BITS = 32
_TRIAL_LEVEL = 3  # candidate layouts are compared at this zstd level at most
_UNPACK_CHUNK = 1 << 16  # groups of 8 codes per step: bounds decode temporaries
DEFAULT_MAX_ENTRIES = 1 << 24  # decoded entries allowed without expected shapes (64 MiB of float32)


def max_body_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The largest body an honest encoder writes for tensors of these shapes: every layout costs at most
    ~4.2 bytes per entry (sparse float32: 4-byte values + a bitmap bit) plus each record's header; a
    decoder fed exactly these shapes refuses anything larger before inflating it."""
    entries = sum(math.prod(s) for s in shapes.values())
    return 5 * entries + 512 * len(shapes) + 4096


class CodecError(ValueError):
    """A blob is not a valid fedfinn message (raised only by decoding)."""


# --------------------------------------------------------------------------
# QTensor


@dataclass(frozen=True, eq=False)  # eq=False: == on ndarray fields is ambiguous
class QTensor:
    """Integer codes with a float32 scale, optionally pruned by a mask.

    ``codes`` may use any integer dtype; decoded tensors use int8.  ``scale``
    has shape () (per tensor) or (shape[0],) (per output channel, broadcast
    along axis 0).  ``mask`` False marks a pruned entry, whose value is 0 and
    whose code is ignored (decoded as 0).
    """

    codes: np.ndarray
    bits: int
    scale: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        codes, scale, mask = self.codes, self.scale, self.mask
        if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu":
            raise TypeError("QTensor.codes must be an integer numpy array")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise TypeError("QTensor.bits must be an int")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"QTensor.bits must be 1..8, got {self.bits}")
        scale = np.asarray(scale)
        if scale.dtype != np.float32:
            raise TypeError(f"QTensor.scale must be float32, got {scale.dtype}")
        if scale.shape != () and (codes.ndim == 0 or scale.shape != codes.shape[:1]):
            raise ValueError(
                f"QTensor.scale shape {scale.shape} must be () or {codes.shape[:1]}"
            )
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("QTensor.scale must be finite and > 0")
        object.__setattr__(self, "scale", scale)
        if mask is not None:
            if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
                raise TypeError("QTensor.mask must be a bool numpy array or None")
            if mask.shape != codes.shape:
                raise ValueError(f"QTensor.mask shape {mask.shape} != codes shape {codes.shape}")
        if not _kept_codes_valid(codes, mask, int(self.bits)):
            raise ValueError(f"QTensor codes out of range for {self.bits} bits")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        """float32 codes * scale, exactly as Brevitas computes int * scale."""
        scale = self.scale
        if scale.ndim == 1:
            scale = scale.reshape((-1,) + (1,) * (self.codes.ndim - 1))
        values = self.codes.astype(np.float32) * scale
        if self.mask is not None:
            # where(), not "* mask": a negative code times 0.0 would give -0.0.
            values = np.where(self.mask, values, np.float32(0.0))
        return np.asarray(values, dtype=np.float32)


def _codes_in_range(codes: np.ndarray, bits: int) -> bool:
    """Every code valid for ``bits`` (``codes`` non-empty): {-1, +1}, or |code| <= 2^(bits-1) - 1."""
    lo, hi = codes.min(), codes.max()
    if bits == 1:
        return bool(lo >= -1 and hi <= 1 and np.count_nonzero(codes) == codes.size)
    top = (1 << (bits - 1)) - 1
    return bool(lo >= -top and hi <= top)


def _kept_codes_valid(codes: np.ndarray, mask: np.ndarray | None, bits: int) -> bool:
    """``_codes_in_range`` of the kept codes (all codes, or those where mask is True)."""
    if mask is None:
        return not codes.size or _codes_in_range(codes, bits)
    if bits >= 2 and codes.size and _codes_in_range(codes, bits):
        return True  # every code is valid, so every kept one is: no gather needed
    kept = np.compress(mask.reshape(-1), codes.reshape(-1))  # == codes[mask], faster
    return not kept.size or _codes_in_range(kept, bits)


def mib(n_bytes: int) -> float:
    """Bytes to MiB (2^20 bytes)."""
    return n_bytes / 2**20


# --------------------------------------------------------------------------
# Bit-level helpers shared by encoder and decoder


def _shuffle(values: np.ndarray) -> bytes:
    """Byte planes of little-endian float32: zstd sees the low-entropy
    sign/exponent bytes together, about 7% smaller on N(0, 0.05) weights."""
    raw = np.ascontiguousarray(values, dtype="<f4").view(np.uint8)
    return raw.reshape(-1, 4).T.tobytes()


def _unshuffle(payload: memoryview, n: int) -> np.ndarray:
    planes = np.frombuffer(payload, dtype=np.uint8).reshape(4, n)
    return np.ascontiguousarray(planes.T).view("<f4").reshape(n).astype(np.float32)


def _pack_fields(u: np.ndarray, bits: int) -> bytes:
    """Pack unsigned fields (< 2^bits) LSB-first, `bits` bits each.

    4 and 2 bits: 2 or 4 fields OR-ed into each byte. Other widths: eight
    fields fill exactly `bits` bytes, so each group of 8 is built as one
    little-endian uint64 (one shifted column at a time) and its low `bits`
    bytes are kept. The bytes equal ``_pack_fields_reference``'s (tested)."""
    u = np.ascontiguousarray(u).reshape(-1)
    if u.dtype != np.uint8:
        u = u.astype(np.uint8)
    if bits == 8:
        return u.tobytes()
    if bits == 1:
        return np.packbits(u, bitorder="little").tobytes()
    n = u.size
    if bits in (2, 4):
        per_byte = 8 // bits
        if n % per_byte:
            u = np.concatenate([u, np.zeros(per_byte - n % per_byte, dtype=np.uint8)])
        cols = u.reshape(-1, per_byte)
        out = cols[:, 0].copy()
        for j in range(1, per_byte):
            out |= cols[:, j] << np.uint8(j * bits)
        return out.tobytes()
    groups = -(-n // 8)
    if n % 8:
        u = np.concatenate([u, np.zeros(groups * 8 - n, dtype=np.uint8)])
    cols = u.reshape(groups, 8)
    words = cols[:, 0].astype("<u8")
    for j in range(1, 8):
        words |= cols[:, j].astype("<u8") << np.uint64(j * bits)
    out = words.view(np.uint8).reshape(groups, 8)[:, :bits]
    return out.tobytes()[: -(-n * bits // 8)]


def _pack_fields_reference(u: np.ndarray, bits: int) -> bytes:
    """The original packer (uint64 shift + reduce over each group of 8): the tests' oracle."""
    if bits == 8:
        return u.astype(np.uint8).tobytes()
    if bits == 1:
        return np.packbits(u.astype(np.uint8), bitorder="little").tobytes()
    n = u.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = u.reshape(-1)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(padded.reshape(groups, 8) << shifts, axis=1)
    out = words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return out.tobytes()[: -(-n * bits // 8)]


def _unpack_fields(payload: memoryview, n: int, bits: int) -> np.ndarray:
    """Inverse of _pack_fields; payload length is checked by the caller."""
    data = np.frombuffer(payload, dtype=np.uint8)
    rem = (n * bits) % 8
    if rem and data[-1] >> rem:
        raise CodecError("nonzero padding bits after the last packed code")
    if bits == 8:
        return data
    if bits == 1:
        return np.unpackbits(data, count=n, bitorder="little")
    groups = -(-n // 8)
    out = np.empty(groups * 8, dtype=np.uint8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    field_mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _UNPACK_CHUNK):
        g1 = min(groups, g0 + _UNPACK_CHUNK)
        chunk = data[g0 * bits : g1 * bits]
        rows = np.zeros((g1 - g0, 8), dtype=np.uint8)
        flat = np.zeros((g1 - g0) * bits, dtype=np.uint8)
        flat[: chunk.size] = chunk  # the last group may be short
        rows[:, :bits] = flat.reshape(-1, bits)
        words = rows.view("<u8").reshape(-1, 1)
        out[g0 * 8 : g1 * 8] = ((words >> shifts) & field_mask).reshape(-1)
    return out[:n]


def _varint_encode(indices: np.ndarray) -> bytes:
    """LEB128 of (first index, then gap - 1 between successive indices).

    Gaps below 128 (one byte each) are the bytes themselves; otherwise each
    varint's 7-bit groups are built one column at a time, in the smallest
    integer type that holds the largest gap."""
    if indices.size == 0:
        return b""
    idx = np.asarray(indices).astype(np.int64, copy=False)
    vals = np.empty(idx.size, dtype=np.int64)
    vals[0] = idx[0]
    np.subtract(idx[1:], idx[:-1], out=vals[1:])
    vals[1:] -= 1
    top = int(vals.max())
    if top < 0x80:
        return vals.astype(np.uint8).tobytes()
    width = (top.bit_length() + 6) // 7
    v = vals.astype(np.uint32 if top < 1 << 32 else np.uint64)
    nbytes = np.ones(v.size, dtype=np.uint8)
    for j in range(1, width):
        nbytes += v >= (1 << (7 * j))
    groups = np.empty((v.size, width), dtype=np.uint8)
    for j in range(width):
        column = (v >> (7 * j)).astype(np.uint8) & np.uint8(0x7F)
        if j < width - 1:
            column |= (nbytes > j + 1).view(np.uint8) << np.uint8(7)  # more bytes follow
        groups[:, j] = column
    used = nbytes[:, None] > np.arange(width, dtype=np.uint8)
    return np.compress(used.reshape(-1), groups.reshape(-1)).tobytes()


def _varint_decode(pos: memoryview, kept: int, numel: int) -> np.ndarray:
    """Kept flat indices from varint gaps, validated against numel."""
    data = np.frombuffer(pos, dtype=np.uint8)
    if kept == 0:
        if data.size:
            raise CodecError("varint positions present for a tensor with 0 kept entries")
        return np.zeros(0, dtype=np.int64)
    last = data < 0x80
    if data.size == 0 or not last[-1]:
        raise CodecError("varint positions end in the middle of a varint")
    ends = np.flatnonzero(last)
    if ends.size != kept:
        raise CodecError(f"varint positions hold {ends.size} varints, header says {kept}")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise CodecError("varint longer than 9 bytes")
    if np.any((lengths > 1) & (data[ends] == 0)):
        raise CodecError("non-minimal varint (ends in a 0x00 byte)")
    within = np.arange(data.size, dtype=np.int64) - np.repeat(starts, lengths)
    parts = (data & 0x7F).astype(np.uint64) << (np.uint64(7) * within.astype(np.uint64))
    gaps = np.add.reduceat(parts, starts)
    if gaps.max() >= np.uint64(numel):
        raise CodecError("varint gap points past the end of the tensor")
    indices = np.cumsum(gaps + np.uint64(1), dtype=np.uint64) - np.uint64(1)
    # Gaps are < numel < 2^62, so only a uint64 wrap could break monotonicity.
    if np.any(indices[1:] <= indices[:-1]) or indices[-1] >= np.uint64(numel):
        raise CodecError(f"sparse positions out of range for {numel} entries")
    return indices.astype(np.int64)


def _bitmap_decode(pos: memoryview, kept: int, numel: int) -> np.ndarray:
    """Boolean keep-mask (flat) from a bitmap, validated against the header."""
    data = np.frombuffer(pos, dtype=np.uint8)
    rem = numel % 8
    if rem and data[-1] >> rem:
        raise CodecError("nonzero padding bits after the bitmap's last entry")
    keep = np.unpackbits(data, count=numel, bitorder="little").view(np.bool_)
    count = int(np.count_nonzero(keep))
    if count != kept:
        raise CodecError(f"bitmap marks {count} kept entries, header says {kept}")
    return keep


# --------------------------------------------------------------------------
# Encoding


def encode(tensors: Mapping[str, np.ndarray | QTensor], level: int = 3, entropy: bool = True) -> bytes:
    """Serialize named float32 arrays and QTensors into one message.

    Programmer errors (wrong dtype, NaN/Inf, bad names) raise TypeError or
    ValueError.  Each tensor takes the smallest of its candidate layouts
    (dense, sparse+bitmap, sparse+varint) as measured by zstd, then the whole
    body is zstd-coded at ``level`` (stored raw when that does not shrink it,
    or always raw with ``entropy=False``: the poster's uncompressed baseline).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError("encode() takes a mapping of name -> ndarray | QTensor")
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError("level must be an int")
    if not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"zstd level must be -131072..22, got {level}")
    if len(tensors) >= 1 << 32:
        raise ValueError("too many tensors")
    trial = _compressor(min(level, _TRIAL_LEVEL))
    parts = [struct.pack("<I", len(tensors))]
    for name, value in tensors.items():
        parts.extend(_encode_tensor(name, value, trial))
    body = b"".join(parts)  # the one copy of the payloads into the body
    return _frame(body, level, entropy)


_compressors = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One ZstdCompressor per level and thread, reused across messages (an instance must not be
    used by two threads at once; a fresh one costs a context set-up per message). The output of a
    one-shot compress does not depend on the context's history."""
    cache = getattr(_compressors, "by_level", None)
    if cache is None:
        cache = _compressors.by_level = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _frame(body: bytes, level: int, entropy: bool = True) -> bytes:
    packed = _compressor(level).compress(body) if entropy else body
    codec, stored = (_CODEC_ZSTD, packed) if len(packed) < len(body) else (_CODEC_RAW, body)
    header = _FRAME.pack(MAGIC, FORMAT_VERSION, codec, 0, len(body), zlib.crc32(stored))
    return header + stored


def _encode_tensor(name: str, value, trial: zstandard.ZstdCompressor) -> tuple:
    """The tensor's record as a tuple of byte strings (joined once, into the body)."""
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__}")
    raw_name = name.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (ValueError)
    if not 1 <= len(raw_name) <= 0xFFFF:
        raise ValueError(f"tensor name must be 1..65535 UTF-8 bytes: {name!r}")
    shape = value.shape if isinstance(value, (np.ndarray, QTensor)) else None
    if shape is None:
        raise TypeError(f"{name}: expected np.ndarray or QTensor, got {type(value).__name__}")
    if len(shape) > _MAX_NDIM or any(d >= 1 << 32 for d in shape):
        raise ValueError(f"{name}: shape {shape} needs ndim <= 8 and dims < 2^32")
    prefix = struct.pack("<H", len(raw_name)) + raw_name
    if isinstance(value, QTensor):
        candidates = _quant_candidates(value, prefix)
    else:
        candidates = _float_candidates(name, value, prefix)
    if len(candidates) == 1:
        return candidates[0]
    # Compare compressed sizes: raw sizes mislead when zeros are cheap anyway.
    return (min((b"".join(rec) for rec in candidates), key=lambda rec: len(trial.compress(rec))),)


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<B{len(shape)}I", len(shape), *shape)


def _float_candidates(name: str, arr: np.ndarray, prefix: bytes) -> list[tuple]:
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 4:
        raise TypeError(f"{name}: plain arrays must be float32, got {arr.dtype}")
    flat = np.ascontiguousarray(arr, dtype="<f4").reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError(f"{name}: NaN or Inf values cannot be encoded")
    head = _shape_bytes(arr.shape) + struct.pack("<B", _FLOAT_BITS)
    dense = (prefix, struct.pack("<BB", _FLOAT_DENSE, 0), head, *_payload(_shuffle(flat)))
    # Sparse drops only +0.0 (all bits zero) so -0.0 survives bit-exactly.
    keep = flat.view(np.uint32) != 0
    if (keep.size - np.count_nonzero(keep)) * 32 <= keep.size:  # a bitmap costs more
        return [dense]
    kept = int(np.count_nonzero(keep))
    where = _kept_positions(keep, kept)
    values = _payload(_shuffle(_gather(flat, keep, where)))
    sparse = (prefix, struct.pack("<BB", _FLOAT_SPARSE, 0), head)
    return [dense] + [sparse + pos + values for pos in _position_options(keep, kept, where)]


def _quant_candidates(q: QTensor, prefix: bytes) -> list[tuple]:
    """Candidate records (each a tuple of byte strings): dense and/or sparse layouts."""
    bits, codes = int(q.bits), q.codes.reshape(-1)
    flags = _FLAG_MASK if q.mask is not None else 0
    if q.scale.ndim == 0:
        scale = struct.pack("<B", _SCALE_TENSOR)
    else:
        scale = struct.pack("<B", _SCALE_CHANNEL)
    scale += np.ascontiguousarray(q.scale, dtype="<f4").tobytes()
    head = _shape_bytes(q.shape) + struct.pack("<B", bits) + scale
    # the packed fields: code + 2^(bits-1) (bits >= 2), or code > 0 (bits == 1)
    fields = _code_fields(codes, bits)
    if q.mask is not None:
        keep = q.mask.reshape(-1)
        n_kept = int(np.count_nonzero(keep))
    elif bits >= 2:
        n_kept = int(np.count_nonzero(codes))
        # the mask of nonzero codes, only if a sparse layout will be tried (see below)
        keep = fields != np.uint8(1 << (bits - 1)) if (codes.size - n_kept) * bits > codes.size else None
    else:
        keep, n_kept = None, codes.size  # a 1-bit code is never 0: everything is kept
    candidates = []
    if n_kept == codes.size or q.mask is None:
        dense = _payload(_pack_fields(fields, bits))
        candidates.append((prefix, struct.pack("<BB", _QUANT_DENSE, flags), head) + dense)
    # Sparse can only pay off when the dropped codes outweigh a bitmap bit each.
    if n_kept < codes.size and (q.mask is not None or (codes.size - n_kept) * bits > codes.size):
        where = _kept_positions(keep, n_kept)
        values = _payload(_pack_fields(_gather(fields, keep, where), bits))
        sparse = (prefix, struct.pack("<BB", _QUANT_SPARSE, flags), head)
        candidates += [sparse + pos + values for pos in _position_options(keep, n_kept, where)]
    return candidates


def _code_fields(codes: np.ndarray, bits: int) -> np.ndarray:
    """The unsigned field of each code (flat uint8): code > 0 at 1 bit, else code + 2^(bits-1)."""
    if bits == 1:
        return (codes > 0).view(np.uint8)
    if codes.dtype == np.int8:
        # code + 2^(bits-1) lies in [1, 2^bits - 1]: the same byte in wrapping uint8 arithmetic
        return codes.view(np.uint8) + np.uint8(1 << (bits - 1))
    return (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)


def _payload(data: bytes) -> tuple[bytes, bytes]:
    return struct.pack("<Q", len(data)), data


def _kept_positions(keep: np.ndarray, kept: int) -> np.ndarray | None:
    """The kept flat indices when the varint option will need them (below 1/4 density), else None."""
    return np.flatnonzero(keep) if kept * 4 < keep.size else None


def _gather(values: np.ndarray, keep: np.ndarray, where: np.ndarray | None) -> np.ndarray:
    """``values[keep]``: by index when the indices are at hand, else np.compress (faster than [keep])."""
    return values.take(where) if where is not None else np.compress(keep, values)


def _position_options(keep: np.ndarray, kept: int | None = None, where: np.ndarray | None = None) -> list[tuple]:
    """Position encodings worth trying; the caller keeps the best compressed."""
    kept = int(np.count_nonzero(keep)) if kept is None else kept
    options = [(_POS_BITMAP, np.packbits(keep, bitorder="little").tobytes())]
    # Varints take >= 1 byte per kept entry: hopeless above 1/4 density.
    if kept * 4 < keep.size:
        options.append((_POS_VARINT, _varint_encode(np.flatnonzero(keep) if where is None else where)))
    return [(struct.pack("<BQQ", enc, kept, len(pos)), pos) for enc, pos in options]


# --------------------------------------------------------------------------
# Decoding


class _Reader:
    """Bounds-checked cursor over the body: every short read is a CodecError."""

    def __init__(self, body: bytes):
        self.view = memoryview(body)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        left = len(self.view) - self.pos
        if n > left:
            raise CodecError(
                f"truncated body: {what} needs {n} bytes at offset {self.pos}, {left} left"
            )
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def u8(self, what: str) -> int:
        return self.unpack("B", what)[0]


def decode(
    blob: bytes,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int = 256 * 2**20,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> dict[str, np.ndarray | QTensor]:
    """Parse and validate a message; raise CodecError on anything malformed.

    ``expected`` (name -> shape) pins the exact set of names and shapes, and
    so the number of decoded entries. ``max_bytes`` caps the uncompressed
    body; without ``expected``, ``max_entries`` caps the total number of
    decoded entries (a sparse record can describe a large tensor in a few
    bytes, so the body size alone does not bound what decoding allocates).
    """
    body = _unframe(blob, max_bytes)
    reader = _Reader(body)
    (count,) = reader.unpack("I", "tensor count")
    if expected is not None:
        # No early count check: the name checks below say which tensor is off.
        expected = {k: tuple(int(d) for d in v) for k, v in expected.items()}
        max_entries = sum(math.prod(s) for s in expected.values())
    budget = [max_entries]  # entries still allowed, shared by all records
    out: dict[str, np.ndarray | QTensor] = {}
    for _ in range(count):
        name, value = _decode_tensor(reader, out, expected, budget)
        out[name] = value
    if reader.pos != len(body):
        raise CodecError(f"{len(body) - reader.pos} trailing bytes after the last tensor")
    if expected is not None and set(out) != set(expected):
        missing = sorted(set(expected) - set(out))
        raise CodecError(f"missing tensors: {missing}")
    return out


def decode_values(
    blob: bytes,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int = 256 * 2**20,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> dict[str, np.ndarray]:
    """decode(), with every QTensor dequantized to float32."""
    decoded = decode(blob, expected=expected, max_bytes=max_bytes, max_entries=max_entries)
    return {
        name: v.dequantize() if isinstance(v, QTensor) else v for name, v in decoded.items()
    }


def _unframe(blob: bytes, max_bytes: int) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode() takes bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if not blob:
        raise CodecError("empty blob")
    if len(blob) < _FRAME.size:
        raise CodecError(f"truncated header: {len(blob)} of {_FRAME.size} bytes")
    magic, version, codec, flags, body_len, crc = _FRAME.unpack_from(blob)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {version} (this decoder reads 1)")
    if flags != 0:
        raise CodecError(f"unknown frame flags 0x{flags:02x}")
    if body_len > max_bytes:
        raise CodecError(f"body of {body_len} bytes exceeds the {max_bytes}-byte limit")
    if codec not in (_CODEC_RAW, _CODEC_ZSTD):
        raise CodecError(f"unknown body codec {codec}")
    stored = blob[_FRAME.size :]
    if codec == _CODEC_RAW and len(stored) < body_len:
        raise CodecError(f"truncated body: {len(stored)} of {body_len} bytes")
    if codec == _CODEC_RAW and len(stored) > body_len:
        raise CodecError(f"{len(stored) - body_len} bytes of trailing garbage after the body")
    if codec == _CODEC_ZSTD and len(stored) >= body_len:
        raise CodecError("zstd body is not smaller than body_len (raw would be stored)")
    # Checked on the stored bytes: corrupt data never reaches the decompressor.
    if zlib.crc32(stored) != crc:
        raise CodecError("CRC32 mismatch: the message is truncated or corrupted")
    return _inflate(stored, body_len) if codec == _CODEC_ZSTD else stored


def _inflate(stored: bytes, body_len: int) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(stored).content_size
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame header: {exc}") from None
    if declared != body_len:
        raise CodecError(f"zstd frame declares {declared} bytes, header says {body_len}")
    try:
        # Content size is known and bounded, so this allocates body_len bytes.
        body = zstandard.ZstdDecompressor().decompress(
            stored, max_output_size=body_len, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd body: {exc}") from None
    if len(body) != body_len:
        raise CodecError(f"zstd body inflated to {len(body)} bytes, header says {body_len}")
    return body


def _decode_tensor(reader: _Reader, seen: dict, expected: dict | None, budget: list[int]):
    name = _read_name(reader, seen, expected)
    try:
        return name, _decode_record(reader, name, expected, budget)
    except CodecError as exc:
        raise CodecError(f"tensor {name!r}: {exc}") from None


def _decode_record(reader: _Reader, name: str, expected: dict | None, budget: list[int]):
    kind, flags, shape, numel = _read_layout(reader, name, expected, budget)
    bits = reader.u8("bits")
    quant = kind in (_QUANT_DENSE, _QUANT_SPARSE)
    if quant and not 1 <= bits <= 8:
        raise CodecError(f"quantized bits must be 1..8, got {bits}")
    if not quant and bits != _FLOAT_BITS:
        raise CodecError(f"float tensor must have bits 32, got {bits}")
    if kind == _QUANT_SPARSE and bits == 1 and not flags & _FLAG_MASK:
        raise CodecError("a 1-bit sparse tensor must carry a mask")
    scale = _read_scale(reader, shape) if quant else None
    keep = None
    n = numel
    if kind in (_FLOAT_SPARSE, _QUANT_SPARSE):
        keep, n = _read_positions(reader, numel)
    entry_bytes = -(-n * bits // 8)
    (payload_len,) = reader.unpack("Q", "payload length")
    if payload_len != entry_bytes:
        raise CodecError(f"payload is {payload_len} bytes, {n} entries need {entry_bytes}")
    payload = reader.take(payload_len, "payload")
    if quant:
        return _build_quant(payload, n, bits, scale, shape, keep, flags)
    return _build_float(payload, n, shape, keep)


def _read_name(reader: _Reader, seen: dict, expected: dict | None) -> str:
    (length,) = reader.unpack("H", "name length")
    if length == 0:
        raise CodecError("empty tensor name")
    try:
        name = bytes(reader.take(length, "name")).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("tensor name is not valid UTF-8") from None
    if name in seen:
        raise CodecError(f"duplicate tensor name {name!r}")
    if expected is not None and name not in expected:
        raise CodecError(f"unexpected tensor {name!r}")
    return name


def _read_layout(reader: _Reader, name: str, expected: dict | None, budget: list[int]):
    kind, flags, ndim = reader.unpack("BBB", "kind/flags/ndim")
    if kind > _QUANT_SPARSE:
        raise CodecError(f"unknown tensor kind {kind}")
    allowed = _FLAG_MASK if kind in (_QUANT_DENSE, _QUANT_SPARSE) else 0
    if flags & ~allowed:
        raise CodecError(f"invalid tensor flags 0x{flags:02x} for kind {kind}")
    if ndim > _MAX_NDIM:
        raise CodecError(f"ndim {ndim} exceeds {_MAX_NDIM}")
    shape = reader.unpack(f"{ndim}I", "dims")
    if expected is not None and shape != expected[name]:
        raise CodecError(f"shape {shape} != expected {expected[name]}")
    numel = math.prod(shape)  # Python int: no overflow; checked against the budget
    if numel >= _MAX_NUMEL or numel > budget[0]:
        raise CodecError(f"{numel} entries exceed the decoder's size limit")
    budget[0] -= numel
    return kind, flags, shape, numel


def _read_scale(reader: _Reader, shape: tuple[int, ...]) -> np.ndarray:
    mode = reader.u8("scale mode")
    if mode == _SCALE_TENSOR:
        count = 1
    elif mode == _SCALE_CHANNEL and shape:
        count = shape[0]
    else:
        raise CodecError(f"invalid scale mode {mode} for shape {shape}")
    raw = reader.take(4 * count, "scales")
    scale = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(scale).all():
        raise CodecError("NaN or Inf scale")
    if not (scale > 0).all():
        raise CodecError("scale must be > 0")
    return scale.reshape(()) if mode == _SCALE_TENSOR else scale


def _read_positions(reader: _Reader, numel: int):
    enc, kept, pos_len = reader.unpack("BQQ", "position header")
    if kept > numel:
        raise CodecError(f"{kept} kept entries but only {numel} in the tensor")
    if enc == _POS_BITMAP:
        if pos_len != -(-numel // 8):
            raise CodecError(f"bitmap is {pos_len} bytes, {numel} entries need {-(-numel // 8)}")
        keep = _bitmap_decode(reader.take(pos_len, "bitmap"), kept, numel)
    elif enc == _POS_VARINT:
        if not kept <= pos_len <= _MAX_VARINT_BYTES * kept:
            raise CodecError(f"{pos_len} varint bytes cannot hold {kept} positions")
        keep = _varint_decode(reader.take(pos_len, "varint positions"), kept, numel)
    else:
        raise CodecError(f"unknown position encoding {enc}")
    return keep, kept


def _scatter(values: np.ndarray, keep: np.ndarray, numel: int) -> np.ndarray:
    """Place kept values (bool mask or index list) into a zero array."""
    out = np.zeros(numel, dtype=values.dtype)
    out[keep] = values
    return out


def _build_float(payload, n, shape, keep) -> np.ndarray:
    values = _unshuffle(payload, n)
    if not np.isfinite(values).all():
        raise CodecError("NaN or Inf value")
    if keep is not None:
        values = _scatter(values, keep, math.prod(shape))
    return values.reshape(shape)


def _build_quant(payload, n, bits, scale, shape, keep, flags) -> QTensor:
    fields = _unpack_fields(payload, n, bits)
    if bits == 1:
        codes = (fields.astype(np.int8) << 1) - np.int8(1)
    else:
        if n and fields.min() == 0:
            raise CodecError(f"code -{1 << (bits - 1)} is outside the narrow {bits}-bit range")
        codes = (fields.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
    numel = math.prod(shape)
    mask = None
    if keep is not None:
        codes = _scatter(codes, keep, numel)
        if flags & _FLAG_MASK:
            mask = keep if keep.dtype == np.bool_ else _scatter(np.ones(n, np.bool_), keep, numel)
            mask = mask.reshape(shape)
    elif flags & _FLAG_MASK:
        mask = np.ones(shape, dtype=np.bool_)
    return QTensor(codes.reshape(shape), bits, scale, mask)
