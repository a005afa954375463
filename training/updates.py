"""Update mode: messages carry sparse, quantized *changes*, with error feedback.

In the default mode (``compression.update = "model"``) every message is a
whole model, compressed (training.compress). In ``update = "delta"`` mode a
message is the difference between what the sender wants the receiver to hold
and what the receiver already holds, reduced to its largest entries:

* per tensor, the ``density`` fraction of entries with the largest magnitude
  is kept (top-k); tensors of at most ``SMALL_TENSOR`` entries (GroupNorm
  weights, biases) are kept whole because their positions would cost more
  than their values. With ``scope="model"`` the same number of entries is
  chosen over all larger tensors at once (one magnitude threshold for the
  model): layers that changed more keep more of their change;
* the kept values are quantized to ``bits`` (1..8) with one float32 scale per
  tensor (bits >= 2: max|v| over the tensor's codes; 1 bit: sign times
  mean|v|, as in signSGD), or sent as float32 when ``bits == 32``;
* the result is one ordinary codec message (training.codec, sparse kinds), so
  the wire format, its checks and its zstd stage are the same as for models.

Error feedback: what a sender dropped or rounded away is not lost. A client
adds its residual (its last update minus what it actually sent) to its next
update. On the downlink the server keeps, per node, an exact copy of the
model that node holds (its *view*) and always sends ``global - view``: what a
downlink message left out is still in that difference the next time.

The server and a client agree on a view through fingerprints (SHA-256 of the
values): the downlink names the fingerprint of the view it was computed from
and of the view the client must hold after applying it. Both sides start from
the run's seeded initial model, so a node that has lost its state (restarted)
and a server that has lost its views (resumed) both fall back to it, and the
mismatch is detected instead of silently training on a wrong model.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from . import codec

SMALL_TENSOR = 1024  # tensors this small travel whole: positions would cost more than values
SCOPES = ("tensor", "model")  # where top-k chooses: within each tensor, or over the whole model
BASE_KEY = "fedfinn-base"  # config-record keys of the downlink fingerprints
TARGET_KEY = "fedfinn-target"

Values = dict[str, np.ndarray]


def fingerprint(values: Values) -> str:
    """SHA-256 (first 16 hex digits) over names, shapes and float32 bytes, in order."""
    h = hashlib.sha256()
    for name, v in values.items():
        arr = np.ascontiguousarray(v, dtype=np.float32)
        h.update(name.encode())
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def subtract(a: Values, b: Values) -> Values:
    return {k: (a[k].astype(np.float32) - b[k].astype(np.float32)).astype(np.float32) for k in a}


def add(a: Values, b: Values) -> Values:
    """``a + b`` in float32; both sides of a link compute it identically, so views stay bit-equal."""
    return {k: (a[k].astype(np.float32) + b[k].astype(np.float32)).astype(np.float32) for k in a}


def _top_k_mask(v: np.ndarray, density: float, magnitude: np.ndarray | None = None) -> np.ndarray | None:
    """Keep-mask of the ``density`` largest |v| (None: keep everything); ``magnitude``: |v| flat, if
    the caller has it.

    Exactly k = ceil(density * n) entries: every |v| above the k-th largest
    magnitude, found by ``np.partition`` on the int32 view of |v| (for
    nonnegative float32 the bit patterns order like the values), several times
    faster than an argpartition of floats. When entries tie at the k-th
    magnitude (more than k would be kept), the choice among them is numpy's
    ``argpartition``'s, as it always was: runs stay bit-identical to earlier
    versions of this function.
    """
    if v.size <= SMALL_TENSOR or density >= 1:
        return None
    return _largest(np.abs(v).reshape(-1) if magnitude is None else magnitude, density).reshape(v.shape)


def _largest(magnitude: np.ndarray, density: float) -> np.ndarray:
    """Flat keep-mask of exactly k = ceil(density * n) largest entries of ``magnitude`` (flat, >= 0)."""
    n = magnitude.size
    k = max(1, math.ceil(density * n))
    bits = magnitude.view(np.int32)
    kth = np.partition(bits, n - k)[n - k]
    keep = bits >= kth
    if int(np.count_nonzero(keep)) != k:  # ties at the k-th magnitude: argpartition decides, as before
        keep = np.zeros(n, dtype=bool)
        keep[np.argpartition(magnitude, n - k)[n - k:]] = True
    return keep


def _model_top_k_masks(magnitudes: dict[str, np.ndarray], density: float) -> dict[str, np.ndarray | None]:
    """Keep-masks of the ``density`` largest |v| over all tensors of more than ``SMALL_TENSOR`` entries
    at once (``magnitudes``: name -> |v| flat); smaller tensors: None (kept whole).

    Exactly k = ceil(density * n) entries of the n in those tensors, as ``_top_k_mask`` does per tensor:
    one threshold on the int32 views; ties at the k-th magnitude are settled by ``argpartition`` over
    the concatenation (tensors in the message's order)."""
    big = [name for name, m in magnitudes.items() if m.size > SMALL_TENSOR]
    masks: dict[str, np.ndarray | None] = {name: None for name in magnitudes}
    if not big or density >= 1:
        return masks
    keep = _largest(np.concatenate([magnitudes[name] for name in big]), density)
    start = 0
    for name in big:
        size = magnitudes[name].size
        masks[name] = keep[start:start + size]
        start += size
    return masks


def _quantize(v: np.ndarray, mask: np.ndarray | None, bits: int, magnitude: np.ndarray) -> codec.QTensor | np.ndarray:
    """The kept entries of ``v`` as codes + one scale (or float32 when bits == 32); ``magnitude``: |v| flat
    (the top-k choice computed it already)."""
    if bits == 32:
        return v if mask is None else np.where(mask, v, np.float32(0)).astype(np.float32)
    flat = v.reshape(-1)  # 1-d even for a scalar: numpy ufuncs on 0-d arrays return scalars
    if bits == 1:
        # mean |v| over the kept entries, summed in the same order as np.abs(v[mask]).mean()
        kept = magnitude.reshape(v.shape) if mask is None else np.compress(mask.reshape(-1), magnitude)
        mag = float(kept.mean()) if kept.size else 0.0
        if not mag > 0:
            # nothing to say: a sign code has no zero, so a zero change (e.g. the first downlink,
            # global - initial model) would arrive as +1 * scale everywhere; send it with nothing kept
            mask = np.zeros(v.shape, dtype=bool)
        scale = np.float32(mag if mag > 0 else 1.0)
        codes = np.greater_equal(flat, np.float32(0)).view(np.int8)  # 1 where v >= 0
        codes = codes + codes
        codes -= 1  # +1 / -1
    else:
        top = 2 ** (bits - 1) - 1
        # max |v| over the kept entries: a top-k mask keeps the largest magnitude, so it is max |v|
        mag = float(magnitude.max()) if flat.size else 0.0
        scale = np.float32(mag / top if mag > 0 else 1.0)
        y = np.divide(flat, scale)
        np.rint(y, out=y)
        # no clamp to +-top needed: scale is mag / top rounded to float32 (relative error <= 2^-24),
        # so |v| / scale <= mag / scale <= top (1 + 2^-23) rounds to at most top
        codes = y.astype(np.int8)
    if mask is not None:
        np.multiply(codes, mask.reshape(-1), out=codes)  # dropped entries carry no code
    codes = codes.reshape(v.shape)
    return codec.QTensor(codes=codes, bits=bits, scale=np.asarray(scale, dtype=np.float32), mask=mask)


def _received(value: codec.QTensor | np.ndarray) -> np.ndarray:
    """What a receiver decodes from ``value`` (made by ``_quantize``) once encoded.

    The codec stores codes, scale and mask (or float32 bits) losslessly, so this is
    ``QTensor.dequantize``: float32(code) * scale, +0.0 where the mask is False. ``_quantize``
    leaves code 0 there, and 0 * scale is already +0.0 (scale > 0), so one multiply suffices.
    A float tensor decodes to its own bits (a sparse one drops only +0.0 entries, which decode
    as +0.0)."""
    if isinstance(value, codec.QTensor):
        return np.multiply(value.codes, value.scale, dtype=np.float32)
    return np.array(value, dtype=np.float32, copy=True)


def compress_update(update: Values, density: float, bits: int, level: int = 3,
                    entropy: bool = True, scope: str = "tensor") -> tuple[bytes, Values]:
    """Encode ``update`` (top-k at ``density`` per tensor or, with ``scope="model"``, over the model;
    ``bits`` per kept value); return the message and exactly what its receiver will decode from it
    (for the sender's error feedback).

    The second value is computed from the encoded tensors (``_received``), not by decoding the
    message again; ``tests/test_updates.py`` checks it against ``codec.decode_values`` bit for bit."""
    if not 0 < density <= 1:
        raise ValueError(f"update density must be in (0, 1], got {density}")
    if bits != 32 and not 1 <= bits <= 8:
        raise ValueError(f"update bits must be 1..8 or 32, got {bits}")
    if scope not in SCOPES:
        raise ValueError(f"update top-k scope must be one of {SCOPES}, got {scope!r}")
    values = {name: np.asarray(v, dtype=np.float32) for name, v in update.items()}
    magnitudes = {name: np.abs(v.reshape(-1)) for name, v in values.items()}
    if scope == "model":
        masks = _model_top_k_masks(magnitudes, density)
    else:
        masks = {name: _top_k_mask(v, density, magnitudes[name]) for name, v in values.items()}
    tensors = {name: _quantize(v, None if masks[name] is None else masks[name].reshape(v.shape), bits,
                               magnitudes[name])
               for name, v in values.items()}
    blob = codec.encode(tensors, level=level, entropy=entropy)
    return blob, {k: _received(t).reshape(np.shape(update[k])) for k, t in tensors.items()}


def values_to_blob(values: Values) -> bytes:
    """Lossless float32 message of ``values`` (state kept between rounds, checkpoints)."""
    return codec.encode({k: np.asarray(v, dtype=np.float32) for k, v in values.items()}, entropy=False)


def blob_to_values(blob: bytes, expected: dict[str, tuple[int, ...]]) -> Values:
    return {k: np.asarray(v, dtype=np.float32).reshape(expected[k])
            for k, v in codec.decode_values(blob, expected=expected, max_bytes=codec.max_body_bytes(expected)).items()}
