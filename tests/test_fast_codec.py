"""The faster encoder and update-mode compression write the bytes the original code wrote.

The original implementations are kept here (or in the codec, ``_pack_fields_reference``)
as oracles; the new ones must produce identical bytes. Update mode's "what the receiver
gets" is computed without decoding; it must equal the decode of the message, bit for bit.
"""

import math
import struct

import numpy as np
import pytest

from training import codec, updates

RNG = np.random.default_rng(20240601)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_fields_equals_the_original(bits):
    for n in list(range(0, 50)) + [255, 256, 257, 4096, 65535, 65537, 100003]:
        for u in (RNG.integers(0, 1 << bits, size=n), np.full(n, (1 << bits) - 1), np.zeros(n)):
            for dtype in (np.uint8, np.int16, np.int64):
                arr = np.asarray(u, dtype=dtype)
                assert codec._pack_fields(arr, bits) == codec._pack_fields_reference(arr, bits), (bits, n, dtype)
    strided = RNG.integers(0, 1 << bits, size=(300, 7)).astype(np.uint8)[:, 3]  # not contiguous
    assert codec._pack_fields(strided, bits) == codec._pack_fields_reference(strided, bits)


def _original_quant_candidates(q, prefix):
    """training.codec._quant_candidates before the speed-up, verbatim (with its _pack_codes); each
    candidate is returned as one part (the encoder now joins a record's parts once)."""
    def pack_codes(codes, bits):
        if bits == 1:
            return codec._pack_fields_reference((codes > 0).astype(np.uint8), 1)
        return codec._pack_fields_reference((codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8), bits)

    bits, codes = int(q.bits), q.codes.reshape(-1)
    flags = codec._FLAG_MASK if q.mask is not None else 0
    if q.scale.ndim == 0:
        scale = struct.pack("<B", codec._SCALE_TENSOR)
    else:
        scale = struct.pack("<B", codec._SCALE_CHANNEL)
    scale += np.ascontiguousarray(q.scale, dtype="<f4").tobytes()
    head = codec._shape_bytes(q.shape) + struct.pack("<B", bits) + scale
    if q.mask is not None:
        keep = q.mask.reshape(-1)
    elif bits >= 2:
        keep = codes != 0
    else:
        keep = np.ones(codes.size, dtype=np.bool_)
    n_kept = int(np.count_nonzero(keep))
    candidates = []
    if n_kept == keep.size or q.mask is None:
        dense = b"".join(codec._payload(pack_codes(codes, bits)))
        candidates.append(prefix + struct.pack("<BB", codec._QUANT_DENSE, flags) + head + dense)
    if n_kept < keep.size and (q.mask is not None or (keep.size - n_kept) * bits > keep.size):
        values = b"".join(codec._payload(pack_codes(codes[keep], bits)))
        sparse = prefix + struct.pack("<BB", codec._QUANT_SPARSE, flags) + head
        candidates += [sparse + b"".join(pos) + values for pos in codec._position_options(keep)]
    return [(c,) for c in candidates]


def _random_qtensor(bits, shape, zero_fraction, masked, dtype, per_channel):
    top = (1 << (bits - 1)) - 1
    if bits == 1:
        codes = np.where(RNG.random(shape) < 0.5, -1, 1)
    else:
        codes = RNG.integers(-top, top + 1, size=shape)
        codes[RNG.random(shape) < zero_fraction] = 0
    mask = None
    if masked:
        mask = RNG.random(shape) >= zero_fraction
        if masked == "all":
            mask[...] = True
        codes = np.where(mask, codes, 0 if bits > 1 else RNG.integers(-100, 100, size=shape))
    scale = RNG.random(shape[0]).astype(np.float32) + 0.1 if per_channel else np.float32(0.37)
    return codec.QTensor(np.asarray(codes, dtype=dtype), bits, np.asarray(scale, np.float32), mask)


def test_encode_equals_the_original_candidates(monkeypatch):
    tensors = {}
    i = 0
    for bits in range(1, 9):
        for shape in [(1,), (7,), (64, 3, 3, 3), (33, 17), (1000,)]:
            for zero_fraction in (0.0, 0.05, 0.5, 0.9, 1.0):
                for masked in (None, "some", "all"):
                    dtype = (np.int8, np.int16, np.int64)[i % 3]
                    tensors[f"t{i}"] = _random_qtensor(bits, shape, zero_fraction, masked, dtype, i % 2 == 0)
                    i += 1
    new = codec.encode(tensors)
    monkeypatch.setattr(codec, "_quant_candidates", _original_quant_candidates)
    assert codec.encode(tensors) == new


def _original_codes_in_range(codes, bits):
    if bits == 1:
        return bool(np.all((codes == 1) | (codes == -1)))
    top = (1 << (bits - 1)) - 1
    return bool(codes.min() >= -top and codes.max() <= top)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_qtensor_accepts_and_refuses_the_same_codes(bits):
    for _ in range(300):
        shape = (int(RNG.integers(1, 20)),)
        codes = RNG.integers(-128, 128, size=shape).astype(np.int8)
        pick = RNG.random(shape)
        top = max(1, (1 << (bits - 1)) - 1)
        codes = np.where(pick < 0.8, np.clip(codes, -top, top), codes).astype(np.int8)
        if bits == 1:
            codes = np.where(pick < 0.8, np.where(codes >= 0, 1, -1), codes).astype(np.int8)
        mask = RNG.random(shape) < 0.7 if RNG.random() < 0.5 else None
        kept = codes if mask is None else codes[mask]
        valid = not kept.size or _original_codes_in_range(kept, bits)
        try:
            codec.QTensor(codes, bits, np.float32(1.0), mask)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == valid, (codes, mask, bits)


# --- update mode -------------------------------------------------------------------------


def _original_compress_update(update, density, bits, level=3, entropy=True):
    """training.updates.compress_update before the speed-up, verbatim."""
    def top_k_mask(v):
        n = v.size
        if n <= updates.SMALL_TENSOR or density >= 1:
            return None
        k = max(1, math.ceil(density * n))
        flat = np.abs(v).ravel()
        keep = np.zeros(n, dtype=bool)
        keep[np.argpartition(flat, n - k)[n - k:]] = True
        return keep.reshape(v.shape)

    def quantize(v, mask):
        kept = v if mask is None else v[mask]
        if bits == 32:
            return v if mask is None else np.where(mask, v, np.float32(0)).astype(np.float32)
        if bits == 1:
            mag = float(np.abs(kept).mean()) if kept.size else 0.0
            scale = np.float32(mag if mag > 0 else 1.0)
            codes = np.asarray(np.where(v >= 0, 1, -1), dtype=np.int8)
        else:
            top = 2 ** (bits - 1) - 1
            mag = float(np.abs(kept).max()) if kept.size else 0.0
            scale = np.float32(mag / top if mag > 0 else 1.0)
            codes = np.asarray(np.clip(np.rint(v / scale), -top, top), dtype=np.int8)
        if mask is not None:
            codes = np.asarray(np.where(mask, codes, 0), dtype=np.int8)
        return codec.QTensor(codes=codes, bits=bits, scale=np.asarray(scale, dtype=np.float32), mask=mask)

    tensors = {}
    for name, v in update.items():
        v = np.asarray(v, dtype=np.float32)
        tensors[name] = quantize(v, top_k_mask(v))
    blob = codec.encode(tensors, level=level, entropy=entropy)
    decoded = codec.decode_values(blob, expected={k: tuple(np.shape(v)) for k, v in update.items()})
    return blob, {k: np.asarray(v, dtype=np.float32).reshape(np.shape(update[k])) for k, v in decoded.items()}


SHAPES = [(), (1,), (7,), (1024,), (1025,), (64, 3, 3, 3), (96, 64, 3, 3), (10, 640), (33, 1, 5, 7)]


def _update(kind):
    out = {}
    for i, shape in enumerate(SHAPES):
        v = (RNG.normal(size=shape) * 10.0 ** RNG.uniform(-5, 1)).astype(np.float32)
        if kind == "ties":  # few distinct magnitudes: many entries tie at the k-th largest
            v = (RNG.integers(-3, 4, size=shape) * 0.25).astype(np.float32)
        elif kind == "zeros":  # mostly exact zeros, some -0.0
            v = np.where(RNG.random(shape) < 0.8, np.float32(0), v).astype(np.float32)
            v = np.where(RNG.random(shape) < 0.1, np.float32(-0.0), v).astype(np.float32)
        elif kind == "constant":
            v = np.full(shape, np.float32(i - 3.5), dtype=np.float32)
        out[f"t{i}"] = v
    return out


def _bits_of(values):
    return {k: np.asarray(v, np.float32).view(np.uint32).copy() for k, v in values.items()}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 32])
@pytest.mark.parametrize("density", [0.0005, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "constant"])
@pytest.mark.parametrize("scope", updates.SCOPES)
def test_what_the_sender_records_is_what_the_receiver_decodes(bits, density, kind, scope):
    update = _update(kind)
    blob, sent = updates.compress_update(update, density, bits, scope=scope)
    received = updates.blob_to_values(blob, {k: v.shape for k, v in update.items()})
    assert list(sent) == list(update)
    for k in update:
        assert sent[k].dtype == np.float32 and sent[k].shape == update[k].shape
        np.testing.assert_array_equal(_bits_of(sent)[k], _bits_of(received)[k], err_msg=k)
    if kind == "normal" and scope == "tensor":  # no ties: the original top-k picks the same entries
        old_blob, old_sent = _original_compress_update(update, density, bits)
        assert blob == old_blob
        for k in update:
            np.testing.assert_array_equal(_bits_of(sent)[k], _bits_of(old_sent)[k], err_msg=k)


def test_top_k_with_ties_keeps_exactly_k_of_the_largest_as_argpartition_chooses():
    """Ties at the k-th magnitude: exactly k of the largest, the same ones the original argpartition
    picked (so update-mode runs stay bit-identical to earlier versions)."""
    v = np.array([3, -1, 2, -2, 2, 1, -2, 0, 2] * 200, dtype=np.float32)  # 1800 entries
    n = v.size
    for density in (0.05, 0.1, 0.3, 0.5, 0.77, 0.999):
        k = math.ceil(density * n)
        keep = updates._top_k_mask(v, density)
        assert keep.sum() == k
        assert np.abs(v[keep]).min() >= np.abs(v[~keep]).max()
        original = np.zeros(n, dtype=bool)
        original[np.argpartition(np.abs(v), n - k)[n - k:]] = True
        np.testing.assert_array_equal(keep, original)


def test_a_wrong_receiver_value_is_caught(monkeypatch):
    """The comparison above is sharp: a sent value one ulp off fails it."""
    update = _update("normal")
    real = updates._received

    def off(value):
        out = real(value)
        flat = out.reshape(-1)
        if flat.size:
            flat[0] = np.nextafter(flat[0], np.float32(np.inf))
        return out

    monkeypatch.setattr(updates, "_received", off)
    blob, sent = updates.compress_update(update, 0.3, 4)
    received = updates.blob_to_values(blob, {k: v.shape for k, v in update.items()})
    assert any(not np.array_equal(_bits_of(sent)[k], _bits_of(received)[k]) for k in update)


def _original_varint_encode(indices):
    """training.codec._varint_encode before the speed-up, verbatim."""
    if indices.size == 0:
        return b""
    vals = np.diff(indices.astype(np.uint64), prepend=np.uint64(0))
    vals[1:] -= np.uint64(1)
    nbytes = np.ones(vals.size, dtype=np.int64)
    for j in range(1, codec._MAX_VARINT_BYTES):
        nbytes += vals >= np.uint64(1 << (7 * j))
    width = int(nbytes.max())
    j = np.arange(width, dtype=np.uint64)
    groups = ((vals[:, None] >> (np.uint64(7) * j)) & np.uint64(0x7F)).astype(np.uint8)
    more = j[None, :] < (nbytes[:, None] - 1).astype(np.uint64)
    groups |= np.where(more, np.uint8(0x80), np.uint8(0))
    return groups[j[None, :] < nbytes[:, None].astype(np.uint64)].tobytes()


def test_varint_encode_equals_the_original():
    cases = [np.zeros(0, np.int64), np.array([0]), np.array([127]), np.array([128]), np.array([0, 1, 2, 130, 131]),
             np.array([5, 2**14 - 1 + 6, 2**21 + 2**14 + 100]), np.array([3, 2**35, 2**35 + 1, 2**61])]
    for density in (0.9, 0.3, 0.05, 0.003, 1e-5):
        for n in (10, 1000, 300000):
            cases.append(np.flatnonzero(RNG.random(n) < density))
    gaps = RNG.integers(0, 2**40, size=500, dtype=np.int64) >> RNG.integers(0, 40, size=500)
    cases.append(np.cumsum(gaps + 1) - 1)
    for idx in cases:
        new = codec._varint_encode(idx)
        assert new == _original_varint_encode(idx), idx[:10]
        if idx.size:
            np.testing.assert_array_equal(codec._varint_decode(memoryview(new), idx.size, int(idx[-1]) + 1), idx)
