"""Hostile client replies through the server's reply handling (``CompressedFedAvg.aggregate_train``).

Over 1,000 malformed replies built around real ResNet-12 messages (fp32 raw and
zstd, 8/4/1-bit codes, 90 % pruned): truncations, bit flips, wrong magic,
version, codec and lengths, declared shapes far larger than the payload,
NaN/Inf values and scales, wrong bit widths, wrong/missing/extra tensor names,
oversized messages and zstd bombs, and Flower-level garbage (error replies,
wrong records, wrong array type, bad example counts). They arrive in rounds of
about 40 together with two valid replies: every malformed one must be
rejected with a logged reason, nothing may raise, the extra memory of a
round's handling stays bounded, and the round's model is exactly the
example-weighted average of the two valid replies.
"""

from __future__ import annotations

import logging
import re
import struct
import time
import tracemalloc
import zlib
from collections import Counter

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from training.codec import FORMAT_VERSION, MAGIC, mib
from training.compress import decode_for, model_to_message
from training.config import load_config
from training.pruning import prune_
from training.runner import InProcessGrid
from training.strategy import CompressedFedAvg, RoundStats, weighted_average
from training.task import make_model, pack, unpack
from training.flower_compat import set_message_ids

BATCH = 40
EXTRA_MEMORY_LIMIT = 96 * 2**20  # per round, beyond the replies themselves


# --- the wire format, written from training/codec.py's docstring --------------------------

def frame(body: bytes, codec: int = 0, *, magic=MAGIC, version=FORMAT_VERSION, flags=0, body_len=None,
          crc=None, stored=None) -> bytes:
    stored = body if stored is None else stored
    return struct.pack("<4sHBBQI", magic, version, codec, flags, len(body) if body_len is None else body_len,
                       zlib.crc32(stored) if crc is None else crc) + stored


def body_of(blob: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(blob[20:]) if blob[6] == 1 else blob[20:]


def records(body: bytes) -> list[dict]:
    """Offsets of every field of every tensor record in a body."""
    out, pos = [], 4
    (count,) = struct.unpack_from("<I", body, 0)
    for _ in range(count):
        r = {"start": pos}
        (n,) = struct.unpack_from("<H", body, pos)
        r["name_off"], r["name"] = pos + 2, body[pos + 2: pos + 2 + n].decode()
        pos += 2 + n
        r["kind_off"], r["flags_off"], r["ndim_off"] = pos, pos + 1, pos + 2
        kind, _, ndim = body[pos], body[pos + 1], body[pos + 2]
        r["kind"], r["dims_off"] = kind, pos + 3
        dims = struct.unpack_from(f"<{ndim}I", body, pos + 3)
        r["dims"] = dims
        pos += 3 + 4 * ndim
        r["bits_off"], r["bits"] = pos, body[pos]
        pos += 1
        if kind in (2, 3):
            r["scale_mode_off"] = pos
            n_scales = 1 if body[pos] == 0 else dims[0]
            r["scales_off"], r["n_scales"] = pos + 1, n_scales
            pos += 1 + 4 * n_scales
        if kind in (1, 3):
            r["pos_off"] = pos
            kept, pos_len = struct.unpack_from("<QQ", body, pos + 1)
            r["kept"] = kept
            pos += 17 + pos_len
        r["payload_len_off"] = pos
        (plen,) = struct.unpack_from("<Q", body, pos)
        r["payload_off"], r["payload_len"] = pos + 8, plen
        pos += 8 + plen
        r["end"] = pos
        out.append(r)
    assert pos == len(body)
    return out


def patched(body: bytes, offset: int, data: bytes) -> bytes:
    return body[:offset] + data + body[offset + len(data):]


# --- the corpus ------------------------------------------------------------------------------

def base_messages() -> dict[str, bytes]:
    cfg = load_config(None, [])
    fp32 = make_model(cfg, seed=1)
    out = {"fp32": model_to_message(fp32, entropy=False), "fp32_zstd": model_to_message(fp32)}
    for bits in (8, 4, 1):
        q = make_model(load_config(None, [f"compression.weight_bits={bits}"]), seed=2)
        out[f"q{bits}"] = model_to_message(q, entropy=bits == 4)
    pruned = make_model(cfg, seed=3)
    masks = prune_(pruned, 0.9)
    out["pruned90"] = model_to_message(pruned, masks, entropy=False)
    q4p = make_model(load_config(None, ["compression.weight_bits=4"]), seed=4)
    out["q4_pruned90"] = model_to_message(q4p, prune_(q4p, 0.9), entropy=False)
    return out


def corpus(bases: dict[str, bytes]):
    """(category, label, blob) of malformed codec messages; yielded lazily (each is MBs)."""
    rng = np.random.default_rng(2024)
    nan, inf = float("nan"), float("inf")
    for name, blob in bases.items():
        # truncations (the frame's CRC or lengths catch every one)
        for k in sorted(set(range(0, 24)) | set(int(x) for x in rng.integers(24, len(blob), 36))):
            yield "truncated", f"{name} cut at {k}", blob[:k]
        # bit flips anywhere (CRC, magic, version, lengths)
        for bit in sorted(set(int(x) for x in rng.integers(0, 8 * len(blob), 40)) | {0, 33, 50, 70, 130}):
            b = bytearray(blob)
            b[bit // 8] ^= 1 << (bit % 8)
            yield "bit flip", f"{name} bit {bit}", bytes(b)
        body = body_of(blob)
        yield "wrong magic", f"{name} magic", frame(body, magic=b"FFNB")
        yield "wrong magic", f"{name} zip magic", frame(body, magic=b"PK\3\4")
        for v in (0, 2, 65535):
            yield "wrong version", f"{name} version {v}", frame(body, version=v)
        yield "wrong codec", f"{name} codec 7", frame(body, 7)
        yield "wrong codec", f"{name} raw body called zstd", frame(body, 1)
        yield "length", f"{name} body_len - 1", frame(body, body_len=len(body) - 1)
        yield "oversized", f"{name} body_len 2**40", frame(body, body_len=2**40)
        yield "oversized", f"{name} trailing copy", blob + blob
        recs = records(body)
        picks = sorted(set(int(x) for x in rng.choice(len(recs), 8, replace=False)) | {0, len(recs) - 1})
        for i in picks:
            r = recs[i]
            tag = f"{name} {r['name']}"
            # wrong tensor names
            renamed = r["name"][:-1] + ("X" if r["name"][-1] != "X" else "Y")
            yield "wrong name", f"{tag} renamed", frame(patched(body, r["name_off"], renamed.encode()))
            other = recs[(i + 1) % len(recs)]["name"]
            if len(other) == len(r["name"]) and other != r["name"]:
                yield "wrong name", f"{tag} duplicated name", frame(patched(body, r["name_off"], other.encode()))
            dropped = struct.pack("<I", len(recs) - 1) + body[4:r["start"]] + body[r["end"]:]
            yield "wrong name", f"{tag} missing", frame(dropped)
            doubled = struct.pack("<I", len(recs) + 1) + body[4:r["end"]] + body[r["start"]:]
            yield "wrong name", f"{tag} twice", frame(doubled)
            # declared shapes far larger than the payload, or merely wrong
            if r["dims"]:
                for d0 in (2**31, 2**32 - 1, r["dims"][0] + 1):
                    yield "shape", f"{tag} dim0 {d0}", frame(patched(body, r["dims_off"], struct.pack("<I", d0)))
                yield "shape", f"{tag} ndim+1", frame(patched(body, r["ndim_off"], bytes([len(r["dims"]) + 1])))
            yield "shape", f"{tag} ndim 9", frame(patched(body, r["ndim_off"], b"\x09"))
            # wrong bit widths
            wrong_bits = (0, 9, 16, 33, 255) if r["kind"] in (2, 3) else (0, 8, 16, 31, 64)
            for bits in wrong_bits:
                yield "bit width", f"{tag} bits {bits}", frame(patched(body, r["bits_off"], bytes([bits])))
            if r["kind"] in (2, 3) and r["bits"] > 1 and r["payload_len"] > 0:  # (no codes: still valid)
                yield "bit width", f"{tag} bits {r['bits'] - 1}", frame(patched(body, r["bits_off"], bytes([r["bits"] - 1])))
            yield "kind", f"{tag} kind 9", frame(patched(body, r["kind_off"], b"\x09"))
            # lengths
            plen = r["payload_len"]
            for bad_len in (plen + 1, plen - 1, 2**40):
                if bad_len >= 0:
                    yield "length", f"{tag} payload_len {bad_len}", frame(patched(body, r["payload_len_off"], struct.pack("<Q", bad_len)))
            # NaN / Inf
            if r["kind"] in (0, 1) and plen >= 4:
                n = plen // 4
                for value in (nan, inf, -inf):
                    j = int(rng.integers(0, n))
                    vb = struct.pack("<f", value)
                    b = bytearray(body)
                    for k in range(4):  # byte-shuffled: byte k of value j sits at k*n + j
                        b[r["payload_off"] + k * n + j] = vb[k]
                    yield "nan/inf", f"{tag} value {value} at {j}", frame(bytes(b))
            elif r["kind"] in (2, 3):
                for value in (nan, inf, 0.0, -1.0):
                    yield "nan/inf", f"{tag} scale {value}", frame(patched(body, r["scales_off"], struct.pack("<f", value)))
    # oversized messages and bombs
    import zstandard

    big = bytes(32 * 2**20)
    yield "oversized", "32 MiB of zeros after the magic", MAGIC + big
    yield "oversized", "zstd bomb: 1 GiB of zeros, declared", frame(b"", 1, body_len=2**30,
                                                                  stored=zstandard.ZstdCompressor().compress(bytes(2**20)))
    yield "oversized", "zstd bomb: 32 MiB, no content size", frame(b"", 1, body_len=len(big),
                                                                  stored=zstandard.ZstdCompressor(write_content_size=False).compress(big))
    yield "oversized", "zstd bomb: 200 MiB declared, 32 MiB inside", frame(b"", 1, body_len=200 * 2**20,
                                                                         stored=zstandard.ZstdCompressor().compress(big))
    yield "oversized", "40 MiB trailing garbage", bases["fp32"] + bytes(40 * 2**20)
    for i in range(20):
        junk = rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
        yield "random", f"random {i}", junk
        yield "random", f"random after header {i}", frame(junk)


def flower_level(to: Message, good: bytes):
    """Replies malformed above the codec: Flower records, array types, metrics."""
    m = {"num-examples": 10, "partition-id": 0, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 0.1,
         "decode-seconds": 0.0, "encode-seconds": 0.0, "bytes-up": len(good), "bytes-down": 0}
    arrays = pack(good)
    yield "client error", "error reply", Message(Error(code=0, reason="ClientApp raised"), reply_to=to)
    yield "client error", "node unavailable", Message(Error(code=5, reason="Node Unavailable"), reply_to=to)
    yield "records", "no arrays", Message(RecordDict({"metrics": MetricRecord(m)}), reply_to=to)
    yield "records", "no metrics", Message(RecordDict({"arrays": arrays}), reply_to=to)
    yield "records", "config instead of metrics", Message(RecordDict({"arrays": arrays, "metrics": ConfigRecord(m)}), reply_to=to)
    yield "records", "arrays under another key", Message(RecordDict({"weights": arrays, "metrics": MetricRecord(m)}), reply_to=to)
    wrong = {
        "array named 'weights'": ArrayRecord({"weights": arrays["message"]}),
        "two arrays": ArrayRecord({"message": arrays["message"], "extra": Array(np.zeros(3, np.uint8))}),
        "float32 array": ArrayRecord({"message": Array(np.frombuffer(good[: len(good) // 4 * 4], np.float32))}),
        "numpy stype": ArrayRecord({"message": Array(np.frombuffer(good, np.uint8))}),
        "plain Flower state dict": ArrayRecord(make_model(load_config(None, [])).state_dict()),
        "empty": ArrayRecord({}),
    }
    for label, rec in wrong.items():
        yield "array type", label, Message(RecordDict({"arrays": rec, "metrics": MetricRecord(m)}), reply_to=to)
    for n in (0, -5, 10**12, 1.5, float("nan")):
        yield "num-examples", f"num-examples {n}", Message(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({**m, "num-examples": n})}), reply_to=to)
    yield "num-examples", "num-examples missing", Message(
        RecordDict({"arrays": arrays, "metrics": MetricRecord({k: v for k, v in m.items() if k != "num-examples"})}),
        reply_to=to)


def reply(to: Message, blob: bytes, n: int = 10) -> Message:
    m = {"num-examples": n, "partition-id": 0, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 0.1,
         "decode-seconds": 0.0, "encode-seconds": 0.0, "bytes-up": len(blob), "bytes-down": 0}
    return Message(RecordDict({"arrays": pack(blob), "metrics": MetricRecord(m)}), reply_to=to)


class Lines(logging.Handler):
    """Keeps the formatted text of each record, not the record: a record's args hold the
    exception, whose traceback holds the reply's buffers (pytest's own capture would keep
    every rejected message alive and blur the memory bound)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_malformed_replies_rejected_logged_bounded_and_round_aggregated():
    cfg = load_config(None, ["federation.num_clients=3"])
    strategy = CompressedFedAvg(cfg)
    grid = InProcessGrid(client_app=None, num_nodes=3)
    msgs = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid))
    for i, msg in enumerate(msgs):
        set_message_ids(msg, message_id=f"request-{i}")
    to = msgs[0]

    good_a = make_model(cfg, seed=11)
    good_b = make_model(cfg, seed=12)
    blob_a, blob_b = model_to_message(good_a), model_to_message(good_b, entropy=False)
    template = make_model(cfg)
    expected = weighted_average([decode_for(template, blob_a), decode_for(template, blob_b)], [30, 10])

    bases = base_messages()
    items = list(flower_level(to, bases["fp32_zstd"]))
    stream = iter(items)  # Flower-level replies first, then the codec corpus, built lazily
    codec_items = corpus(bases)

    def next_batch():
        batch = []
        for item in stream:
            batch.append(item)
            if len(batch) == BATCH:
                return batch
        for category, label, blob in codec_items:
            batch.append((category, label, reply(to, blob)))
            if len(batch) == BATCH:
                break
        return batch

    counts: Counter = Counter()
    reasons: Counter = Counter()
    crashes, accepted_bad, worst_extra, total, rounds = [], [], 0, 0, 0
    server_log = logging.getLogger("fedfinn.server")
    lines, propagate = Lines(), server_log.propagate
    server_log.addHandler(lines)
    server_log.propagate = False
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        while batch := next_batch():
            rounds += 1
            strategy.current = RoundStats(rounds)
            replies = [reply(to, blob_a, 30)] + [m for _, _, m in batch] + [reply(to, blob_b, 10)]
            lines.lines.clear()
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            try:
                down, _ = strategy.aggregate_train(rounds, replies)
            except Exception as err:  # noqa: BLE001 - the point: nothing may escape
                crashes.append(f"round {rounds}: {type(err).__name__}: {err}")
                continue
            _, peak = tracemalloc.get_traced_memory()
            worst_extra = max(worst_extra, peak - before)
            rejected = strategy.current.rejected
            total += len(batch)
            for category, label, _ in batch:
                counts[category] += 1
            if len(rejected) != len(batch) or strategy.current.bytes_up != [len(blob_a), len(blob_b)]:
                accepted_bad.append(f"round {rounds}: {len(rejected)} rejected of {len(batch)}: "
                                    f"{[label for _, label, _ in batch][:5]}")
            for r in rejected:
                assert r["reason"].strip(), r
                reasons[re.sub(r"[\d.]+", "#", r["reason"])[:60]] += 1
            logged = [line for line in lines.lines if "rejected: " in line]
            assert len(logged) == len(batch), f"round {rounds}: {len(logged)} log lines for {len(batch)} rejections"
            got = decode_for(template, unpack(down))
            for name, value in expected.items():
                assert np.array_equal(got[name], value), f"round {rounds}: {name} is not the average of the valid replies"
            del replies, batch, down
    finally:
        elapsed = time.perf_counter() - t0
        tracemalloc.stop()
        server_log.removeHandler(lines)
        server_log.propagate = propagate
    print(f"\nfuzz: {total} malformed replies in {rounds} rounds, {elapsed:.1f} s; "
          f"extra memory per round at most {mib(worst_extra):.1f} MiB; by kind: {dict(counts)}")
    print("reasons:", "; ".join(f"{k} x{v}" for k, v in reasons.most_common(25)))
    assert not crashes, crashes[:5]
    assert not accepted_bad, accepted_bad[:5]
    assert total >= 1000
    assert worst_extra < EXTRA_MEMORY_LIMIT
    assert {"truncated", "bit flip", "wrong magic", "wrong version", "shape", "nan/inf", "bit width",
            "wrong name", "oversized", "array type", "num-examples", "client error"} <= set(counts)
