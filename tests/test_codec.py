"""Tests for training/codec.py: round trips, headline sizes, hostile input.

Several tests build messages by hand from the format described in the codec's
module docstring (record(), frame(), ...), independently of encode(): that
checks the docstring is enough to write a compatible encoder, and lets the
fuzz corpus carry a correct CRC around deliberately broken fields.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard

from training.codec import (
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    QTensor,
    decode,
    decode_values,
    encode,
    max_body_bytes,
    mib,
)

F32 = np.float32


# --------------------------------------------------------------------------
# Hand-built messages, following the module docstring


def shuf(values) -> bytes:
    raw = np.asarray(values, dtype="<f4").view(np.uint8)
    return raw.reshape(-1, 4).T.tobytes()


def pack_fields(fields, bits: int) -> bytes:
    """Reference bit packer written from the docstring, bit by bit."""
    stream = []
    for u in fields:
        stream += [(u >> b) & 1 for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(bit << i for i, bit in enumerate(stream[k : k + 8])) for k in range(0, len(stream), 8))


def leb128(v: int) -> bytes:
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def record(name=b"w", kind=0, flags=0, dims=(2, 2), bits=32, scale=b"", positions=b"",
           payload=b"", *, name_len=None, ndim=None, payload_len=None) -> bytes:
    name_len = len(name) if name_len is None else name_len
    ndim = len(dims) if ndim is None else ndim
    payload_len = len(payload) if payload_len is None else payload_len
    return (
        struct.pack("<H", name_len) + name + struct.pack("<BBB", kind, flags, ndim)
        + struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<B", bits) + scale
        + positions + struct.pack("<Q", payload_len) + payload
    )


def scales(mode: int, *values) -> bytes:
    return struct.pack("<B", mode) + np.asarray(values, dtype="<f4").tobytes()


def positions(enc: int, kept: int, data: bytes, pos_len=None) -> bytes:
    return struct.pack("<BQQ", enc, kept, len(data) if pos_len is None else pos_len) + data


def body(*records, count=None) -> bytes:
    return struct.pack("<I", len(records) if count is None else count) + b"".join(records)


def frame(body_bytes: bytes, codec=0, *, magic=MAGIC, version=FORMAT_VERSION, flags=0,
          body_len=None, crc=None, stored=None) -> bytes:
    if stored is None:
        stored = zstandard.ZstdCompressor(level=3).compress(body_bytes) if codec == 1 else body_bytes
    header = struct.pack(
        "<4sHBBQI", magic, version, codec, flags,
        len(body_bytes) if body_len is None else body_len,
        zlib.crc32(stored) if crc is None else crc,
    )
    return header + stored


def body_of(blob: bytes) -> bytes:
    stored = blob[20:]
    return zstandard.ZstdDecompressor().decompress(stored) if blob[6] == 1 else stored


# Valid hand-built records; the invalid corpus breaks one field at a time.
F_DENSE = dict(name=b"f", kind=0, dims=(2, 2), bits=32, payload=shuf([1.0, -0.0, 2.5, -3.0]))
F_SPARSE = dict(name=b"s", kind=1, dims=(10,), bits=32,
                positions=positions(1, 2, leb128(3) + leb128(4)), payload=shuf([1.5, -2.0]))
Q_DENSE = dict(name=b"q", kind=2, dims=(3,), bits=3, scale=scales(0, 0.5),
               payload=pack_fields([1, 4, 7], 3))  # codes -3, 0, 3
Q_MASKED = dict(name=b"m", kind=3, flags=1, dims=(9,), bits=1, scale=scales(0, 0.25),
                positions=positions(0, 3, bytes([0b00010001, 0b1])), payload=pack_fields([1, 0, 1], 1))
Q_CHANNEL = dict(name=b"c", kind=2, dims=(2, 3), bits=8, scale=scales(1, 0.5, 2.0),
                 payload=pack_fields([128 + c for c in (-127, 0, 127, 1, -1, 5)], 8))
SPEC_RECORDS = [F_DENSE, F_SPARSE, Q_DENSE, Q_MASKED, Q_CHANNEL]


def spec_body(**override_by_name) -> bytes:
    """Body of all SPEC_RECORDS, with fields of some records overridden."""
    recs = []
    for fields in SPEC_RECORDS:
        key = fields["name"].decode()
        recs.append(record(**{**fields, **override_by_name.get(key, {})}))
    return body(*recs)


def test_hand_built_message_decodes_as_documented():
    for codec in (0, 1):
        out = decode(frame(spec_body(), codec))
        assert list(out) == ["f", "s", "q", "m", "c"]
        assert out["f"].ravel().view(np.uint32).tolist() == np.array([1.0, -0.0, 2.5, -3.0], F32).view(np.uint32).tolist()
        expected_s = np.zeros(10, F32)
        expected_s[[3, 8]] = [1.5, -2.0]
        assert np.array_equal(out["s"], expected_s)
        q = out["q"]
        assert q.codes.tolist() == [-3, 0, 3] and q.bits == 3 and q.scale.shape == () and q.mask is None
        assert q.dequantize().tolist() == [-1.5, 0.0, 1.5]
        m = out["m"]
        assert m.mask.tolist() == [i in (0, 4, 8) for i in range(9)]
        assert m.codes.tolist() == [1, 0, 0, 0, -1, 0, 0, 0, 1]
        assert m.dequantize().tolist() == [0.25, 0, 0, 0, -0.25, 0, 0, 0, 0.25]
        c = out["c"]
        assert c.codes.tolist() == [[-127, 0, 127], [1, -1, 5]] and c.scale.tolist() == [0.5, 2.0]
        assert c.dequantize().tolist() == [[-63.5, 0.0, 63.5], [2.0, -2.0, 10.0]]


def test_reference_bit_packing_matches_encoder():
    rng = np.random.default_rng(5)
    for bits in range(1, 9):
        top = (1 << (bits - 1)) - 1
        signs = rng.choice([-1, 1], 13)
        codes = signs if bits == 1 else signs * rng.integers(1, top + 1, 13)  # no zeros: dense
        q = QTensor(codes.astype(np.int8), bits, np.asarray(F32(0.5)))
        blob = encode({"q": q})
        fields = ((codes > 0).astype(int) if bits == 1 else codes + (1 << (bits - 1))).tolist()
        want = record(name=b"q", kind=2, dims=(13,), bits=bits, scale=scales(0, 0.5),
                      payload=pack_fields(fields, bits))
        assert body_of(blob) == body(want)


# --------------------------------------------------------------------------
# Round trips


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
        a.view(np.uint32), b.view(np.uint32)
    )


def first_kind(blob: bytes) -> int:
    b = body_of(blob)
    (name_len,) = struct.unpack_from("<H", b, 4)
    return b[6 + name_len]


def test_float_dense_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 33)) * 0.05).astype(F32)
    specials = [-0.0, 0.0, 1e-45, -1e-45, 1.17e-38, 3.4028235e38, -3.4028235e38, 1e30, -7e-40]
    w.reshape(-1)[: len(specials)] = specials
    scalar = np.asarray(F32(-0.0))
    empty = np.zeros((0, 5), F32)
    big_endian = w.astype(">f4")
    out = decode(encode({"w": w, "scalar": scalar, "empty": empty, "be": big_endian}))
    assert bits_equal(out["w"], w)
    assert bits_equal(out["scalar"], scalar) and np.signbit(out["scalar"])
    assert out["empty"].shape == (0, 5)
    assert bits_equal(out["be"], w)
    assert first_kind(encode({"w": w})) == 0


@pytest.mark.parametrize("zero_frac", [0.5, 0.9, 0.99])
def test_float_sparse_round_trip(zero_frac):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((200, 101)) * 0.05).astype(F32)
    w[rng.random(w.shape) < zero_frac] = 0.0
    w[0, :3] = [-0.0, 1e-45, -3e38]  # -0.0 is a value, not a pruned zero
    blob = encode({"w": w})
    assert first_kind(blob) == 1
    out = decode(blob)["w"]
    assert bits_equal(out, w)
    dense_bytes = 4 * w.size
    assert len(blob) < dense_bytes * (1 - zero_frac) + w.size / 8 + 100


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "partial", "all", "heavy"])
def test_qtensor_round_trip(bits, per_channel, mask_kind):
    rng = np.random.default_rng(bits * 10 + per_channel)
    shape = (12, 5, 3, 3)
    top = (1 << (bits - 1)) - 1
    if bits == 1:
        codes = rng.choice(np.array([-1, 1], np.int8), shape)
    else:
        codes = np.clip(np.round(rng.standard_normal(shape) * top / 3), -top, top).astype(np.int16)
    scale = (rng.random(12) + 0.01).astype(F32) if per_channel else np.asarray(F32(0.0123))
    mask = {
        "none": None,
        "partial": rng.random(shape) < 0.6,
        "all": np.ones(shape, bool),
        "heavy": rng.random(shape) < 0.02,
    }[mask_kind]
    q = QTensor(codes, bits, scale, mask)
    out = decode(encode({"q": q}))["q"]
    assert isinstance(out, QTensor) and out.bits == bits and out.codes.dtype == np.int8
    assert out.scale.dtype == np.float32 and out.scale.shape == scale.shape
    assert np.array_equal(out.scale.view(np.uint32), scale.view(np.uint32))
    if mask is None:
        assert out.mask is None
        assert np.array_equal(out.codes, codes)
    else:
        assert np.array_equal(out.mask, mask)
        assert np.array_equal(out.codes[mask], codes[mask]) and not out.codes[~mask].any()
    assert bits_equal(out.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_zero_codes_may_go_sparse_without_a_mask(bits):
    rng = np.random.default_rng(2)
    codes = np.zeros((300, 40), np.int8)
    hit = rng.random(codes.shape) < 0.03
    codes[hit] = rng.choice([-1, 1], hit.sum())
    q = QTensor(codes, bits, np.asarray(F32(0.1)))
    blob = encode({"q": q})
    assert first_kind(blob) == 3
    out = decode(blob)["q"]
    assert out.mask is None and np.array_equal(out.codes, codes)


def test_odd_shapes_and_scalars():
    qs = {
        "scalar": QTensor(np.asarray(-3, np.int32), 3, np.asarray(F32(2.0))),
        "empty": QTensor(np.zeros((0, 4), np.int8), 4, np.zeros(0, F32)),
        "one": QTensor(np.array([1], np.uint8), 2, np.array([0.5], F32)),
        "seven": QTensor(np.array([-1, 1, 1, -1, 1, 1, -1], np.int64), 1, np.asarray(F32(1.0))),
        "masked_scalar": QTensor(np.asarray(5, np.int8), 4, np.asarray(F32(1.0)), np.asarray(False)),
    }
    out = decode(encode(qs))
    assert out["scalar"].codes.shape == () and int(out["scalar"].codes) == -3
    assert out["empty"].codes.shape == (0, 4) and out["empty"].scale.shape == (0,)
    assert out["one"].scale.shape == (1,) and out["one"].codes.tolist() == [1]
    assert out["seven"].codes.tolist() == [-1, 1, 1, -1, 1, 1, -1]
    assert out["masked_scalar"].mask.shape == () and not out["masked_scalar"].mask
    assert out["masked_scalar"].dequantize() == 0.0


def test_order_kept_and_decode_values():
    rng = np.random.default_rng(3)
    names = ["z", "a", "m", "ünïcode/名前", "b.weight"]
    msg = {}
    for i, n in enumerate(names):
        if i % 2:
            msg[n] = QTensor(rng.integers(-7, 8, (4, 4)).astype(np.int8), 4, np.asarray(F32(0.25)))
        else:
            msg[n] = rng.standard_normal((3, 2)).astype(F32)
    blob = encode(msg)
    assert list(decode(blob)) == names
    values = decode_values(blob)
    assert list(values) == names
    for n in names:
        want = msg[n].dequantize() if isinstance(msg[n], QTensor) else msg[n]
        assert bits_equal(values[n], want)
    assert decode(encode({})) == {}


def test_dequantize_matches_brevitas_style_int_times_scale():
    codes = np.array([[-127, 3], [64, 0]], np.int8)
    scale = np.array([0.1, 0.3], F32)
    q = QTensor(codes, 8, scale)
    want = codes.astype(F32) * scale.reshape(2, 1)
    assert bits_equal(q.dequantize(), want)
    pruned = QTensor(codes, 8, scale, np.array([[False, True], [True, True]]))
    assert pruned.dequantize()[0, 0] == 0 and not np.signbit(pruned.dequantize()[0, 0])


def test_encode_rejects_programmer_errors():
    good = np.ones(3, F32)
    with pytest.raises(TypeError):
        encode({"x": np.ones(3)})  # float64
    with pytest.raises(TypeError):
        encode({"x": np.ones(3, np.int32)})
    with pytest.raises(TypeError):
        encode({"x": [1.0, 2.0]})
    with pytest.raises(TypeError):
        encode({1: good})
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError):
            encode({"x": np.array([1, bad], F32)})
    with pytest.raises(ValueError):
        encode({"": good})
    with pytest.raises(ValueError):
        encode({"x" * 70000: good})
    with pytest.raises(ValueError):
        encode({"\udc80": good})
    with pytest.raises(ValueError):
        encode({"x": np.zeros((1,) * 9, F32)})
    with pytest.raises(ValueError):
        encode({"x": good}, level=99)
    one = np.asarray(F32(1))
    with pytest.raises(ValueError):
        QTensor(np.array([-128]), 8, one)  # narrow range: -128 is not a code
    with pytest.raises(ValueError):
        QTensor(np.array([0]), 1, one)  # binary codes are +-1
    with pytest.raises(ValueError):
        QTensor(np.array([1]), 9, one)
    with pytest.raises(TypeError):
        QTensor(np.array([1.0]), 4, one)
    with pytest.raises(TypeError):
        QTensor(np.array([1]), 4, np.float64(1))
    with pytest.raises(ValueError):
        QTensor(np.array([1]), 4, np.asarray(F32(0)))
    with pytest.raises(ValueError):
        QTensor(np.array([1]), 4, np.asarray(F32(np.nan)))
    with pytest.raises(ValueError):
        QTensor(np.ones((2, 2), np.int8), 4, np.ones(3, F32))
    with pytest.raises(ValueError):
        QTensor(np.ones((2, 2), np.int8), 4, one, np.ones(4, bool))
    # A pruned entry's code is ignored, even one outside the range.
    QTensor(np.array([0, 1]), 1, one, np.array([False, True]))


def test_expected_names_and_shapes():
    msg = {"a": np.ones((2, 3), F32), "b": QTensor(np.ones(4, np.int8), 2, np.asarray(F32(1)))}
    blob = encode(msg)
    assert list(decode(blob, expected={"a": (2, 3), "b": (4,)})) == ["a", "b"]
    assert list(decode(blob, expected={"b": [4], "a": (2, 3)})) == ["a", "b"]
    cases = [
        ({"a": (2, 3)}, "unexpected tensor 'b'"),
        ({"a": (2, 3), "b": (4,), "c": (1,)}, r"missing tensors: \['c'\]"),
        ({"a": (2, 3), "c": (4,)}, "unexpected tensor 'b'"),
        ({"a": (3, 2), "b": (4,)}, r"tensor 'a': shape \(2, 3\) != expected \(3, 2\)"),
        ({"a": (2, 3), "b": (4, 1)}, "tensor 'b': shape"),
        ({}, "unexpected tensor 'a'"),
    ]
    for expected, words in cases:
        with pytest.raises(CodecError, match=words):
            decode(blob, expected=expected)


def test_max_bytes_is_checked_before_decompressing():
    zeros = {"z": np.full((2048, 1024), F32(1.0))}  # 8 MiB body, tiny when compressed
    blob = encode(zeros)
    assert len(blob) < 2**16
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="exceeds"):
            decode(blob, max_bytes=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert decode(blob, max_bytes=9 * 2**20)["z"].shape == (2048, 1024)
    # Entry budget without expected shapes: max_entries in all, whatever the payload holds.
    sparse = {"s": np.zeros(3_000_000, F32)}
    sparse["s"][5] = 1.0
    blob = encode(sparse)
    with pytest.raises(CodecError, match="size limit"):
        decode(blob, max_entries=2_000_000)
    assert decode(blob, max_entries=3_000_000)["s"][5] == 1.0
    # with expected shapes the budget is exactly their entries
    with pytest.raises(CodecError, match="shape"):
        decode(blob, expected={"s": (2_000_000,)})


def test_a_tiny_message_cannot_make_the_decoder_allocate_gigabytes():
    """A 60-byte sparse record claiming 2^31 entries (8 GiB of float32 zeros) with nothing kept: refused by the
    default entry budget before anything is allocated (it used to be 8 * max_bytes = 2^31 entries)."""
    bomb = frame(body(record(name=b"s", kind=1, dims=(1 << 16, 1 << 15), positions=positions(1, 0, b""))))
    assert len(bomb) < 80
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="size limit"):
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_a_model_decoder_refuses_bodies_larger_than_the_model():
    """decode_for (what the server does with every reply) caps the body at what an honest message of that
    model can be: an 8 KB zstd bomb inflating to 40 MB is refused before it inflates."""
    from training.compress import decode_for, expected_shapes
    from training.models import build_model

    model = build_model("resnet12", 10, 32)
    limit = max_body_bytes(expected_shapes(model))
    assert 3_100_000 < limit < 4_200_000  # 780,266 float32 entries + headers
    bomb = encode({"z": np.full(10_000_000, F32(1.0))})  # dense: a 40 MB body, compressed to a few KB
    assert len(bomb) < 8192
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="exceeds"):
            decode_for(model, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_codec_choice_raw_when_zstd_does_not_help():
    noise = np.random.default_rng(4).integers(0, 2**32, 64, dtype=np.uint32)
    noise = noise.view(F32)
    noise = np.where(np.isfinite(noise), noise, F32(1))
    blob = encode({"n": noise})
    assert blob[6] == 0
    assert bits_equal(decode(blob)["n"], noise)
    blob = encode({"z": np.ones(4096, F32)})
    assert blob[6] == 1


# --------------------------------------------------------------------------
# Headline sizes on a tensor set shaped like the study's ResNet-12


def resnet12_shapes() -> dict[str, tuple[int, ...]]:
    shapes, cin = {}, 3
    for i, c in enumerate((16, 40, 80, 160)):
        shapes[f"block{i}.conv1.weight"] = (c, cin, 3, 3)
        shapes[f"block{i}.conv2.weight"] = (c, c, 3, 3)
        shapes[f"block{i}.conv3.weight"] = (c, c, 3, 3)
        shapes[f"block{i}.shortcut.weight"] = (c, cin, 1, 1)
        for k in range(4):
            shapes[f"block{i}.norm{k}.weight"] = (c,)
            shapes[f"block{i}.norm{k}.bias"] = (c,)
        cin = c
    shapes["fc.weight"] = (10, 160)
    shapes["fc.bias"] = (10,)
    return shapes


def model_messages() -> dict[str, dict]:
    shapes = resnet12_shapes()
    rng = np.random.default_rng(0)
    w = {k: (rng.standard_normal(s) * 0.05).astype(F32) for k, s in shapes.items()}
    is_weight = {k: len(s) > 1 for k, s in shapes.items()}  # conv/linear weights

    def quantized(bits):
        out = {}
        for k, v in w.items():
            if not is_weight[k]:
                out[k] = v
            elif bits == 1:  # sign with a mean|w| scale, as training/models/quant.py
                out[k] = QTensor(np.where(v >= 0, 1, -1).astype(np.int8), 1, np.asarray(F32(np.abs(v).mean())))
            else:
                top = 2 ** (bits - 1) - 1
                scale = F32(np.abs(v).max() / top)
                out[k] = QTensor(np.round(v / scale).astype(np.int8), bits, np.asarray(scale))
        return out

    def pruned(frac):
        mags = np.concatenate([np.abs(v).ravel() for k, v in w.items() if is_weight[k]])
        cut = np.partition(mags, int(frac * mags.size))[int(frac * mags.size)]
        return {k: np.where(np.abs(v) < cut, F32(0), v) if is_weight[k] else v for k, v in w.items()}

    return {
        "fp32": w, "int8": quantized(8), "int4": quantized(4), "binary": quantized(1),
        "fp32 pruned 90%": pruned(0.9), "fp32 pruned 99%": pruned(0.99),
    }


def test_model_message_sizes():
    shapes = resnet12_shapes()
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params == 780_266
    raw_fp32 = mib(4 * n_params)  # 2.976 MiB
    limits = {"fp32": raw_fp32 * 1.01, "int8": 0.76, "int4": 0.39, "binary": 0.11,
              "fp32 pruned 90%": 0.37, "fp32 pruned 99%": 0.05}
    sizes = {}
    print(f"\nResNet-12-shaped message, {n_params} parameters (raw fp32 {raw_fp32:.4f} MiB)")
    for case, msg in model_messages().items():
        t0 = time.perf_counter()
        blob = encode(msg)
        t1 = time.perf_counter()
        values = decode_values(blob, expected=shapes)
        t2 = time.perf_counter()
        sizes[case] = mib(len(blob))
        print(f"  {case:16s} {sizes[case]:.4f} MiB  (limit {limits[case]:.3f}; "
              f"encode {1e3 * (t1 - t0):.0f} ms, decode {1e3 * (t2 - t1):.0f} ms)")
        for k, v in msg.items():
            want = v.dequantize() if isinstance(v, QTensor) else v
            assert bits_equal(values[k], want), (case, k)
    for case, limit in limits.items():
        assert sizes[case] <= limit, (case, sizes[case], limit)
    # Lossless fp32 only shrinks by what zstd finds in the sign/exponent bytes.
    assert sizes["fp32"] >= 0.8 * raw_fp32


def test_byte_shuffle_helps_on_weight_like_data():
    w = (np.random.default_rng(0).standard_normal(200_000) * 0.05).astype(F32)
    plain = len(zstandard.ZstdCompressor(level=3).compress(w.tobytes()))
    coded = len(encode({"w": w}))
    print(f"\nN(0,0.05) float32: zstd {plain} bytes, shuffled codec {coded} bytes "
          f"({100 * (1 - coded / plain):.1f}% smaller)")
    assert coded < 0.95 * plain


def test_sparse_positions_cost_under_1_5_bytes_per_kept_entry():
    rng = np.random.default_rng(6)
    w = np.zeros(780_000, F32)
    kept = rng.random(w.size) < 0.01
    w[kept] = 1.0  # constant values: what remains is the cost of the positions
    blob = encode({"w": w})
    values_only = len(encode({"v": np.ones(int(kept.sum()), F32)}))
    per_entry = (len(blob) - values_only) / kept.sum()
    print(f"\n99% sparse positions: {per_entry:.3f} bytes per kept entry")
    assert per_entry < 1.3


# --------------------------------------------------------------------------
# Hostile input


def valid_blobs() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((8, 6)) * 0.05).astype(F32)
    sparse = w.copy()
    sparse[rng.random(w.shape) < 0.8] = 0
    mask = rng.random((8, 6)) < 0.5
    msg = {
        "conv.weight": w,
        "sparse": sparse,
        "q4": QTensor(np.round(w / np.abs(w).max() * 7).astype(np.int8), 4, np.abs(w).max(axis=(1,)) / 7),
        "q1m": QTensor(np.where(w >= 0, 1, -1).astype(np.int8), 1, np.asarray(F32(0.04)), mask),
        "q8": QTensor(np.arange(-20, 20, dtype=np.int8).reshape(4, 10), 8, np.asarray(F32(0.01))),
    }
    big = {"ones": np.ones(3000, F32), **msg}
    blob_small = encode(msg)
    out = {"small": blob_small, "small_zstd": frame(body_of(blob_small), 1), "compressible": encode(big),
           "spec": frame(spec_body(), 0), "spec_zstd": frame(spec_body(), 1)}
    for blob in out.values():
        decode(blob)
    return out


def targeted_invalid() -> list[tuple[str, bytes, dict | None]]:
    """(label, blob, expected) for blobs broken in one specific way."""
    nan, inf = float("nan"), float("inf")
    good = spec_body()
    c = []

    def add(label, body_bytes, codec=0, expected=None, **frame_kw):
        c.append((label, frame(body_bytes, codec, **frame_kw), expected))

    def bad(label, **override_by_name):
        add(label, spec_body(**override_by_name))
        add(label + " (zstd)", spec_body(**override_by_name), 1)

    # Frame
    c.append(("empty", b"", None))
    for magic in (b"FFNB", b"ffnc", b"\0\0\0\0", b"PK\3\4"):
        add(f"magic {magic!r}", good, magic=magic)
    for version in (0, 2, 3, 255, 65535):
        add(f"version {version}", good, version=version)
    for codec in (2, 3, 127, 255):
        add(f"codec {codec}", good, stored=good, **{"codec": codec})
    for flags in (1, 2, 128, 255):
        add(f"frame flags {flags}", good, flags=flags)
    for body_len in (0, len(good) - 1, len(good) + 1, 2**28, 2**40, 2**64 - 1):
        add(f"raw body_len {body_len}", good, body_len=body_len)
        add(f"zstd body_len {body_len}", good, 1, body_len=body_len)
    add("crc off by one", good, crc=zlib.crc32(good) ^ 1)
    add("crc zero", good, crc=0)
    add("raw trailing garbage", good, stored=good + b"\0")
    add("zstd trailing garbage", good, 1, stored=zstandard.ZstdCompressor().compress(good) + b"\0")
    add("two zstd frames", good, 1, stored=zstandard.ZstdCompressor().compress(good[:50])
        + zstandard.ZstdCompressor().compress(good[50:]))
    add("zstd frame, raw codec", good, 0, stored=zstandard.ZstdCompressor().compress(good))
    add("raw body, zstd codec", good, 1, stored=good)
    add("zstd without content size", good, 1,
        stored=zstandard.ZstdCompressor(write_content_size=False).compress(good))
    padded = good + b"\0" * 4000  # compressible, but the frame declares another size
    add("zstd declares other size", good, 1, stored=zstandard.ZstdCompressor().compress(padded))
    add("zstd bomb beyond max_bytes", padded, 1, body_len=2**30)
    add("zstd not smaller", b"\0\0\0\0", 1)
    add("body shorter than count", b"\0\0", 0)

    # Body structure
    add("count too large", body(*[record(**r) for r in SPEC_RECORDS], count=6))
    add("count 2**32-1", body(count=2**32 - 1))
    add("count too small (trailing record)", body(*[record(**r) for r in SPEC_RECORDS], count=4))
    add("trailing byte after records", good + b"\0")
    add("duplicate name", body(record(**F_DENSE), record(**F_DENSE)))
    add("duplicate name across kinds", body(record(**F_DENSE), record(**{**Q_DENSE, "name": b"f"})))
    for name in (b"\xff", b"\xc3", b"a\x80b", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"):
        bad(f"non-UTF-8 name {name!r}", f={"name": name})
    bad("empty name", f={"name": b""})
    bad("name_len past end", f={"name_len": 60000})
    for kind in (4, 5, 127, 255):
        bad(f"kind {kind}", f={"kind": kind})
    for flags in (1, 2, 255):
        bad(f"float flags {flags}", f={"flags": flags})
        bad(f"float sparse flags {flags}", s={"flags": flags})
    for flags in (2, 3, 128):
        bad(f"quant flags {flags}", q={"flags": flags})
    for ndim in (9, 10, 255):
        bad(f"ndim {ndim}", f={"ndim": ndim, "dims": (2, 2) + (1,) * (ndim - 2)})
    bad("ndim claims more dims than present", f={"ndim": 3})
    # Huge declared dims with tiny payloads.
    for dims in [(2**32 - 1,) * 2, (2**32 - 1,) * 8, (2**31, 4), (2**16, 2**16), (65536, 8192)]:
        bad(f"float dims {dims}", f={"dims": dims})
        if np.prod(dims, dtype=object) > 8 * 256 * 2**20:  # else a valid, if large, tensor
            bad(f"sparse dims {dims}", s={"dims": dims})
        bad(f"quant dims {dims}", q={"dims": dims})
        bad(f"masked dims {dims}", m={"dims": dims})
    bad("float dims 2**28, 4-byte payload", f={"dims": (2**28,)})
    bad("quant dims 2**27, 2-byte payload", q={"dims": (2**27,)})
    bad("dims one bigger", f={"dims": (2, 3)})
    bad("dims one smaller", f={"dims": (3,)})
    bad("bitmap dims grow", m={"dims": (17,)})
    bad("varint index past end", s={"dims": (8,)})
    for bits in (0, 1, 8, 16, 31, 33, 64, 255):
        bad(f"float bits {bits}", f={"bits": bits})
    for bits in (0, 9, 16, 32, 255):
        bad(f"quant bits {bits}", q={"bits": bits})
    bad("quant bits 6 with a 3-bit payload", q={"bits": 6})
    # Scales
    for value in (nan, inf, -inf, 0.0, -0.0, -1.0, -1e-45):
        bad(f"scale {value}", q={"scale": scales(0, value)})
        bad(f"channel scale {value}", c={"scale": scales(1, 1.0, value)})
    bad("scale mode 2", q={"scale": scales(2, 0.5)})
    bad("scale mode 255", q={"scale": scales(255, 0.5)})
    bad("per-channel scale on a scalar", q={"dims": (), "scale": scales(1), "payload": pack_fields([1], 3)})
    bad("per-channel scales missing", c={"scale": scales(1, 1.0)})
    bad("per-channel scale count too big", c={"scale": scales(1, 1.0, 2.0, 3.0)})
    # Positions
    for enc in (2, 3, 255):
        bad(f"position encoding {enc}", s={"positions": positions(enc, 2, leb128(3) + leb128(4))})
    bad("kept > numel", s={"positions": positions(1, 11, bytes(11)), "payload": shuf([1.0] * 11)})
    bad("kept 2**64-1", s={"positions": positions(1, 2**64 - 1, bytes(2))})
    bad("kept more than varints", s={"positions": positions(1, 3, leb128(3) + leb128(4))})
    bad("kept fewer than varints", s={"positions": positions(1, 1, leb128(3) + leb128(4)), "payload": shuf([1.0])})
    bad("varint unterminated", s={"positions": positions(1, 2, leb128(3) + b"\x84")})
    bad("varint non-minimal", s={"positions": positions(1, 2, leb128(3) + b"\x84\x00")})
    bad("varint 10 bytes", s={"positions": positions(1, 2, leb128(3) + b"\x80" * 9 + b"\x01")})
    bad("varint gap past end", s={"positions": positions(1, 2, leb128(3) + leb128(6))})
    bad("varint first past end", s={"positions": positions(1, 2, leb128(10) + leb128(0))})
    bad("varint gap huge", s={"positions": positions(1, 2, leb128(3) + leb128(2**62))})
    bad("varint index wraps", s={"dims": (2**20, 2**10), "positions": positions(1, 2, leb128(2**29) + leb128(2**63 - 1))})
    bad("varint bytes for 0 kept", s={"positions": positions(1, 0, b"\x01"), "payload": b""})
    bad("pos_len past end", s={"positions": positions(1, 2, leb128(3) + leb128(4), pos_len=2**40)})
    bad("pos_len 2**64-1", s={"positions": positions(1, 2, b"", pos_len=2**64 - 1)})
    bad("bitmap too short", m={"positions": positions(0, 3, bytes([0b00010001]))})
    bad("bitmap too long", m={"positions": positions(0, 3, bytes([0b00010001, 1, 0]))})
    bad("bitmap padding bit", m={"positions": positions(0, 3, bytes([0b00010001, 0b11]))})
    bad("bitmap popcount high", m={"positions": positions(0, 3, bytes([0b00010011, 1]))})
    bad("bitmap popcount low", m={"positions": positions(0, 3, bytes([0b00010000, 1]))})
    bad("1-bit sparse without mask flag", m={"flags": 0})
    # Payloads
    for name, fields in (("f", F_DENSE), ("s", F_SPARSE), ("q", Q_DENSE), ("m", Q_MASKED), ("c", Q_CHANNEL)):
        n = len(fields["payload"])
        for plen in (n - 1, n + 1, 2**40, 2**64 - 1):
            if plen >= 0:
                bad(f"{name} payload_len {plen}", **{name: {"payload_len": plen}})
        bad(f"{name} payload short", **{name: {"payload": fields["payload"][:-1], "payload_len": n}})
        bad(f"{name} payload long", **{name: {"payload": fields["payload"] + b"\0"}})
    for value in (nan, inf, -inf):
        bad(f"dense value {value}", f={"payload": shuf([1.0, value, 2.0, 3.0])})
        bad(f"sparse value {value}", s={"payload": shuf([value, 1.0])})
    bad("signalling NaN", f={"payload": shuf(np.array([0x7F800001, 0, 0, 0], np.uint32).view(F32))})
    for bits in range(2, 9):
        n = 3 if bits != 8 else 6
        dims = (3,) if bits != 8 else (2, 3)
        key = "q" if bits != 8 else "c"
        bad(f"{bits}-bit code -2^(b-1)", **{key: {"bits": bits, "dims": dims, "payload": pack_fields([0] + [1] * (n - 1), bits)}})
    bad("3-bit padding bits", q={"payload": bytes([225, 0b11])})
    bad("1-bit padding bits", m={"payload": bytes([0b1101])})

    # Names and shapes against expected
    shapes = {"f": (2, 2), "s": (10,), "q": (3,), "m": (9,), "c": (2, 3)}
    add("expected: extra name", good, expected={**shapes, "x": (1,)})
    add("expected: missing name", good, expected={k: v for k, v in shapes.items() if k != "m"})
    add("expected: renamed", good, expected={**{k: v for k, v in shapes.items() if k != "q"}, "Q": (3,)})
    add("expected: wrong shape", good, expected={**shapes, "c": (3, 2)})
    add("expected: wrong rank", good, expected={**shapes, "s": (10, 1)})
    add("expected: scalar shape", good, expected={**shapes, "q": ()})
    add("expected: empty", good, expected={})
    return c


def corpus() -> list[tuple[str, bytes, dict | None]]:
    rng = np.random.default_rng(11)
    items = targeted_invalid()
    for label, blob in valid_blobs().items():
        cut_points = range(len(blob)) if len(blob) < 700 else sorted(set(rng.integers(0, len(blob), 150)) | set(range(24)))
        items += [(f"{label} cut at {k}", blob[:k], None) for k in cut_points]
        items += [(f"{label} + garbage", blob + b"\0", None), (f"{label} + garbage2", blob + blob, None)]
        n_bits = 8 * len(blob)
        flips = sorted(set(range(160)) | set(rng.integers(160, n_bits, 120)))
        for bit in flips:
            mutated = bytearray(blob)
            mutated[bit // 8] ^= 1 << (bit % 8)
            items.append((f"{label} bit {bit} flipped", bytes(mutated), None))
        # Truncated bodies behind a correct CRC: hits every field boundary.
        b = body_of(blob)
        for k in range(len(b)) if len(b) < 700 else rng.integers(0, len(b), 100):
            items.append((f"{label} body cut at {k}", frame(b[:k], int(k % 5 == 0)), None))
    for i in range(150):
        junk = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        items.append((f"random {i}", junk, None))
        items.append((f"random after magic {i}", MAGIC + junk, None))
        items.append((f"random after header {i}", MAGIC + struct.pack("<HBBQI", 1, 0, 0, len(junk), zlib.crc32(junk)) + junk, None))
        items.append((f"random body {i}", frame(junk, int(i % 5 == 0)), None))
    return items


def test_fuzz_corpus_all_rejected_fast_and_bounded():
    items = corpus()
    assert len(items) >= 1000
    wrong = []
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        for label, blob, expected in items:
            try:
                decode(blob, expected=expected)
            except CodecError as exc:
                assert str(exc), label
            except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
                wrong.append(f"{label}: {type(exc).__name__}: {exc}")
            else:
                wrong.append(f"{label}: accepted")
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\nfuzz: {len(items)} malformed blobs rejected in {elapsed:.2f} s, peak {mib(peak):.2f} MiB traced")
    assert not wrong, "\n".join(wrong[:30])
    assert elapsed < 20
    assert peak < 64 * 2**20


def test_random_body_mutations_never_crash():
    """Bytes changed behind a correct CRC may still form a valid message; the
    decoder must then return one, and otherwise raise CodecError only."""
    rng = np.random.default_rng(12)
    bodies = [body_of(b) for b in valid_blobs().values()]
    outcomes = {"rejected": 0, "accepted": 0}
    t0 = time.perf_counter()
    for i in range(600):
        b = bytearray(bodies[i % len(bodies)])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(b)))
            b[pos] = int(rng.integers(0, 256)) if rng.random() < 0.5 else b[pos] ^ (1 << int(rng.integers(0, 8)))
        try:
            out = decode(frame(bytes(b), i % 2), max_bytes=2**20)
        except CodecError:
            outcomes["rejected"] += 1
        else:
            outcomes["accepted"] += 1
            for v in out.values():
                assert isinstance(v, (np.ndarray, QTensor))
    print(f"\nrandom body mutations: {outcomes} in {time.perf_counter() - t0:.2f} s")
    assert outcomes["rejected"] > 300


def test_decode_rejects_non_bytes():
    with pytest.raises(TypeError):
        decode("FFNC")  # type: ignore[arg-type]
    assert decode(bytearray(encode({"a": np.ones(2, F32)})))["a"].tolist() == [1, 1]
    assert decode(memoryview(encode({"a": np.ones(2, F32)})))["a"].tolist() == [1, 1]
