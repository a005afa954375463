"""Update mode (compression.update = "delta"): top-k + quantized changes, error feedback, node copies."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from training import codec, updates
from training.client_app import STATE_KEY, initial_values, receive_update
from training.config import ConfigError, load_config
from training.recorder import read_metrics
from training.runner import InProcessGrid, run
from training.strategy import CompressedFedAvg
from training.task import make_model, pack, unpack
from training.flower_compat import set_message_ids

from test_federated import tiny  # tests/ is on sys.path (pytest prepend import mode)


def _change(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv": rng.normal(size=(32, 16, 3, 3)).astype(np.float32),
            "bias": rng.normal(size=(32,)).astype(np.float32),
            "scalar": np.asarray(0.5, dtype=np.float32)}


@pytest.mark.parametrize("bits", [1, 4, 8, 32])
def test_top_k_keeps_the_largest_entries_and_small_tensors_whole(bits):
    change = _change()
    blob, sent = updates.compress_update(change, density=0.1, bits=bits)
    raw = codec.decode(blob)["conv"]
    conv = change["conv"]
    kept = raw.mask if isinstance(raw, codec.QTensor) else sent["conv"] != 0  # a kept value may round to 0
    assert kept.sum() == int(np.ceil(0.1 * conv.size))
    assert np.abs(conv[kept]).min() >= np.abs(conv[~kept]).max()  # exactly the largest magnitudes
    bias = codec.decode(blob)["bias"]
    assert (bias.mask is None) if isinstance(bias, codec.QTensor) else np.count_nonzero(bias) == 32
    assert sent["scalar"] == pytest.approx(0.5, rel=0.2 if bits < 4 else 0.01)
    # ``sent`` is what a receiver decodes from the bytes, bit for bit
    received = codec.decode_values(blob)
    for k in change:
        np.testing.assert_array_equal(np.asarray(received[k]).reshape(change[k].shape), sent[k])
    if bits == 32:
        np.testing.assert_array_equal(sent["conv"][kept], conv[kept])
    elif bits > 1:  # rounding error of at most half a step
        step = np.abs(conv[kept]).max() / (2 ** (bits - 1) - 1)
        assert np.abs(sent["conv"][kept] - conv[kept]).max() <= step / 2 + 1e-6
    dense = codec.encode({k: np.asarray(v) for k, v in change.items()})
    assert len(blob) < len(dense) / 3


@pytest.mark.parametrize("bits", [1, 4, 32])
def test_model_wide_top_k_keeps_the_largest_entries_of_the_whole_model(bits):
    """One threshold over every large tensor: a layer whose change is ten times smaller keeps (almost) none."""
    change = _change()
    change["quiet"] = (change["conv"][::-1] * 0.1).copy()  # same size, a tenth of the magnitude
    blob, sent = updates.compress_update(change, density=0.1, bits=bits, scope="model")
    decoded = codec.decode(blob)
    big = ("conv", "quiet")
    kept = {k: decoded[k].mask if isinstance(decoded[k], codec.QTensor) else sent[k] != 0 for k in big}
    n = sum(change[k].size for k in big)
    assert sum(int(kept[k].sum()) for k in big) == int(np.ceil(0.1 * n))
    smallest_kept = min(np.abs(change[k][kept[k]]).min() for k in big if kept[k].any())
    largest_dropped = max(np.abs(change[k][~kept[k]]).max() for k in big)
    assert smallest_kept >= largest_dropped  # exactly the largest magnitudes of the model
    assert kept["conv"].sum() > 10 * kept["quiet"].sum()
    bias = decoded["bias"]  # small tensors still travel whole
    assert (bias.mask is None) if isinstance(bias, codec.QTensor) else np.count_nonzero(bias) == 32
    received = codec.decode_values(blob)
    for k in change:
        np.testing.assert_array_equal(np.asarray(received[k]).reshape(change[k].shape), sent[k])
    # per tensor, the quiet layer would have kept its own tenth
    per_tensor = codec.decode(updates.compress_update(change, density=0.1, bits=bits)[0])
    if bits != 32:
        assert per_tensor["quiet"].mask.sum() == int(np.ceil(0.1 * change["quiet"].size))


def test_model_wide_top_k_with_ties_keeps_exactly_k():
    change = {"a": np.ones((40, 40), dtype=np.float32), "b": -np.ones((40, 40), dtype=np.float32)}
    blob, sent = updates.compress_update(change, density=0.3, bits=4, scope="model")
    assert sum(int(np.count_nonzero(v)) for v in sent.values()) == int(np.ceil(0.3 * 3200))
    with pytest.raises(ValueError, match="scope"):
        updates.compress_update(change, density=0.3, bits=4, scope="layer")
    with pytest.raises(ConfigError, match="update_topk"):
        load_config(None, ["compression.update=\"delta\"", "compression.update_topk=\"layer\""])


@pytest.mark.parametrize("bits", [1, 2, 8, 32])
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_a_zero_change_arrives_as_zero(bits, density):
    """A sign code has no zero: at 1 bit a zero change once arrived as +1 * scale in every kept entry."""
    zero = {k: np.zeros_like(v) for k, v in _change().items()}
    blob, sent = updates.compress_update(zero, density=density, bits=bits)
    received = codec.decode_values(blob)
    for k in zero:
        np.testing.assert_array_equal(sent[k], zero[k])
        np.testing.assert_array_equal(np.asarray(received[k]).reshape(zero[k].shape), zero[k])


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_the_first_downlink_leaves_every_node_on_the_initial_model(tmp_path, cifar10, bits):
    """Round 1 sends global - initial model = 0: each node must train from the initial model itself."""
    cfg = tiny(tmp_path, "u", "compression.update=\"delta\"", f"compression.update_bits={bits}",
               "compression.update_density_down=0.2")
    strategy = CompressedFedAvg(cfg)
    grid = InProcessGrid(client_app=None, num_nodes=5)
    msgs = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid))
    init = initial_values(cfg)
    for m in msgs:
        context = Context(run_id=1, node_id=m.metadata.dst_node_id, node_config={}, state=RecordDict(),
                          run_config={})
        view, _ = receive_update(cfg, make_model(cfg), unpack(m.content["arrays"]), m.content["config"], context)
        assert updates.fingerprint(view) == updates.fingerprint(init)


def test_bad_density_and_bits_are_refused():
    with pytest.raises(ValueError, match="density"):
        updates.compress_update(_change(), density=0, bits=8)
    with pytest.raises(ValueError, match="bits"):
        updates.compress_update(_change(), density=0.1, bits=16)
    with pytest.raises(ConfigError, match="update_density"):
        load_config(None, ["compression.update=\"delta\"", "compression.update_density=1.5"])
    with pytest.raises(ConfigError, match="prune_rate"):
        load_config(None, ["compression.update=\"delta\"", "compression.prune_rate=0.5"])
    with pytest.raises(ConfigError, match="compression.update"):
        load_config(None, ["compression.update=\"gradients\""])


def test_error_feedback_loses_nothing():
    """Over many rounds, what was sent plus the residual left is exactly what was meant to be sent."""
    total_change = {k: np.zeros_like(v) for k, v in _change().items()}
    total_sent = {k: np.zeros_like(v) for k, v in total_change.items()}
    residual = {k: np.zeros_like(v) for k, v in total_change.items()}
    for r in range(20):
        change = _change(seed=r)
        total_change = updates.add(total_change, change)
        u = updates.add(change, residual)
        _, sent = updates.compress_update(u, density=0.05, bits=4)
        residual = updates.subtract(u, sent)
        total_sent = updates.add(total_sent, sent)
    for k in total_change:
        np.testing.assert_allclose(total_sent[k] + residual[k], total_change[k], atol=1e-4)
    # and the residual stays bounded: it does not grow with the number of rounds
    assert np.abs(residual["conv"]).max() < 20 * np.abs(_change()["conv"]).max() / 4


def test_fingerprint_sees_one_changed_value():
    a = _change()
    b = {k: v.copy() for k, v in a.items()}
    assert updates.fingerprint(a) == updates.fingerprint(b)
    b["conv"][3, 2, 1, 0] = np.nextafter(b["conv"][3, 2, 1, 0], np.float32(10))
    assert updates.fingerprint(a) != updates.fingerprint(b)


def _downlink(cfg, base, target):
    blob, sent = updates.compress_update(updates.subtract(target, base), 0.1, 8)
    view = updates.add(base, sent)
    config = ConfigRecord({updates.BASE_KEY: updates.fingerprint(base), updates.TARGET_KEY: updates.fingerprint(view)})
    return blob, config, view


def test_node_copy_follows_the_server_and_starts_over_when_lost(cifar10):
    cfg = load_config(None, ["compression.update=\"delta\""])
    model = make_model(cfg)
    init = initial_values(cfg)
    target = {k: v + np.float32(0.01) for k, v in init.items()}
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    blob, config, view = _downlink(cfg, init, target)  # a fresh node holds the initial model
    got, residual = receive_update(cfg, model, blob, config, context)
    assert updates.fingerprint(got) == updates.fingerprint(view) and residual is None
    assert STATE_KEY in context.state.array_records

    blob2, config2, view2 = _downlink(cfg, view, target)  # next round: a change against the kept copy
    got2, _ = receive_update(cfg, model, blob2, config2, context)
    assert updates.fingerprint(got2) == updates.fingerprint(view2)

    # a change against a copy the node does not hold: refused, and the copy is dropped
    stale_blob, stale_config, _ = _downlink(cfg, view, target)
    with pytest.raises(ValueError, match="stale model copy"):
        receive_update(cfg, model, stale_blob, stale_config, context)
    assert STATE_KEY not in context.state.array_records
    # the server starts the node over from the initial model: accepted
    blob3, config3, view3 = _downlink(cfg, init, target)
    got3, _ = receive_update(cfg, model, blob3, config3, context)
    assert updates.fingerprint(got3) == updates.fingerprint(view3)


def test_server_starts_a_failed_node_over(tmp_path, cifar10):
    cfg = tiny(tmp_path, "u", "compression.update=\"delta\"", "federation.fraction_train=1.0")
    strategy = CompressedFedAvg(cfg)
    grid = InProcessGrid(client_app=None, num_nodes=5)
    init_fp = updates.fingerprint(strategy.init_values)
    msgs = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid))
    assert all(m.content["config"][updates.BASE_KEY] == init_fp for m in msgs)
    assert len(strategy.views) == 5
    for m in msgs:
        set_message_ids(m, message_id=f"id{m.metadata.dst_node_id}")
    change, _ = updates.compress_update({k: np.zeros_like(v) for k, v in strategy.init_values.items()}, 0.1, 8)
    metrics = {"num-examples": 10, "partition-id": 0, "train-loss": 1.0, "train-accuracy": 0.5,
               "train-seconds": 0.1, "decode-seconds": 0.0, "encode-seconds": 0.0}
    replies = [Message(Error(code=0, reason="boom"), reply_to=msgs[0])]
    for m in msgs[1:]:
        reply = Message(RecordDict({"arrays": pack(change), "metrics": MetricRecord(metrics)}), reply_to=m)
        set_message_ids(reply, src_node_id=m.metadata.dst_node_id)
        replies.append(reply)
    strategy.aggregate_train(1, replies)
    failed = msgs[0].metadata.dst_node_id
    assert failed not in strategy.views and len(strategy.views) == 4
    # its next downlink is a change against the initial model; the others' against their copies
    before = {n: updates.fingerprint(v) for n, v in strategy.views.items()}
    again = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)}
    assert again[failed].content["config"][updates.BASE_KEY] == init_fp
    assert {n: m.content["config"][updates.BASE_KEY] for n, m in again.items() if n != failed} == before


@pytest.mark.parametrize("topk", ["tensor", "model"])
def test_delta_run_is_small_and_every_reply_is_accepted(tmp_path, cifar10, topk):
    """Parallel workers keep each node's copy between rounds: no reply is refused as stale."""
    common = ["federation.rounds=3", "federation.fraction_train=1.0", "federation.num_clients=2",
              "federation.backend=\"parallel\""]
    rows = read_metrics(run(tiny(tmp_path, "delta", "compression.update=\"delta\"",
                                 f"compression.update_topk=\"{topk}\"", *common), progress=False))
    ref = read_metrics(run(tiny(tmp_path, "model", *common), progress=False))
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["rejected"] == [] for r in rows)
    assert rows[0]["bytes_down_each"] and max(rows[0]["bytes_down_each"]) < 4096  # round 1: no change yet
    assert max(rows[-1]["bytes_up"]) < ref[-1]["bytes_up"][0] / 8
    assert rows[-1]["bytes_down"] < ref[-1]["bytes_down"] / 8
    assert 0 <= rows[-1]["test_accuracy"] <= 1
    # the checkpoint is the global model itself, lossless: it decodes for the model
    blob = (tmp_path / "delta" / "checkpoints" / "round_003.ffnc").read_bytes()
    assert set(codec.decode_values(blob)) == set(initial_values(tiny(tmp_path, "x")))
