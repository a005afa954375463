"""What a bad client or a hostile file system cannot do to the server side (training/).

* a reply's finite but huge values never crash a round (update mode used to overflow the float32 sum);
* the norm bound and the robust rules (median, trimmed mean) keep a poisoned reply out of the model;
* malformed metrics are a rejected reply, not an exception in aggregation;
* certificate files get their modes whatever the umask or the files left at their names.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from test_federated import tiny
from training import codec
from training.certs import make_certs
from training.compress import decode_for, expected_shapes, model_to_message, travelling_values
from training.flower_compat import set_message_ids
from training.runner import InProcessGrid
from training.strategy import CompressedFedAvg
from training.task import make_model, pack


def round_messages(strategy, server_round: int, arrays) -> list[Message]:
    grid = InProcessGrid(client_app=None, num_nodes=strategy.cfg.federation.num_clients)
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    for m in msgs:
        set_message_ids(m, message_id=f"r{server_round}-{m.metadata.dst_node_id}")
    return msgs


def reply(to: Message, blob: bytes, n: int = 10, **metrics) -> Message:
    m = {"num-examples": n, "partition-id": 0, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 0.1,
         "decode-seconds": 0.0, "encode-seconds": 0.0, **metrics}
    r = Message(RecordDict({"arrays": pack(blob), "metrics": MetricRecord(m)}), reply_to=to)
    set_message_ids(r, src_node_id=to.metadata.dst_node_id)
    return r


def constant_message(model, value: float) -> bytes:
    return codec.encode({k: np.full(s, np.float32(value)) for k, s in expected_shapes(model).items()})


def test_update_mode_huge_finite_changes_never_crash_a_round(tmp_path):
    """3e38 changes in two consecutive rounds: the float32 sum overflows in round 2. Before, aggregate_train
    raised "NaN or Inf values cannot be encoded"; now the round keeps its model and says why."""
    cfg = tiny(tmp_path, "u", "compression.update=\"delta\"", "federation.fraction_train=0.4")
    strategy = CompressedFedAvg(cfg)
    arrays = strategy.initial_arrays()
    for server_round in (1, 2):
        msgs = round_messages(strategy, server_round, arrays)
        huge = [reply(m, constant_message(strategy.template, 3e38)) for m in msgs]
        new, _ = strategy.aggregate_train(server_round, huge)
        arrays = new if new is not None else arrays
    assert new is None and any("does not fit float32" in n for n in strategy.current.notes)
    assert all(np.isfinite(v).all() for v in travelling_values(strategy.server_model).values())


def _three_replies(cfg, strategy, poison):
    arrays = strategy.initial_arrays()
    msgs = round_messages(strategy, 1, arrays)
    received = decode_for(strategy.template, strategy.last_down)
    honest = []
    for i, m in enumerate(msgs):
        model = make_model(cfg, seed=100 + i)  # a stand-in for local training: other weights
        honest.append(reply(m, model_to_message(model)))
    bad = make_model(cfg, seed=99)
    values = travelling_values(bad)
    poisoned = {k: (received[k] + poison(v - received[k])).astype(np.float32) for k, v in values.items()}
    honest[0] = reply(msgs[0], codec.encode(poisoned))
    return honest, received


@pytest.mark.parametrize("rule,extra", [("mean", []), ("mean", ["federation.max_update_norm=1000.0"]),
                                        ("median", []), ("trimmed_mean", ["federation.trim_fraction=0.25"])])
def test_a_poisoned_reply_in_model_mode(tmp_path, rule, extra):
    """One of four replies carries its update scaled by 1e30. FedAvg takes it in (plain poisoning, but no
    crash); the norm bound rejects it with the norm in the reason; median and trimmed mean ignore it."""
    cfg = tiny(tmp_path, rule, "federation.num_clients=4", "federation.fraction_train=1.0",
               f"federation.aggregation=\"{rule}\"", *extra)
    strategy = CompressedFedAvg(cfg)
    replies, received = _three_replies(cfg, strategy, lambda d: d * np.float32(1e30))
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    top = max(float(np.abs(v).max()) for v in travelling_values(strategy.server_model).values())
    if rule == "mean" and not extra:
        assert top > 1e27  # the poison is in: the norm bound or a robust rule is what keeps it out
    else:
        assert top < 100
    if extra and rule == "mean":
        assert len(strategy.current.rejected) == 1 and "update norm" in strategy.current.rejected[0]["reason"]


def test_update_norm_bound_applies_to_changes_in_update_mode(tmp_path):
    cfg = tiny(tmp_path, "n", "compression.update=\"delta\"", "federation.max_update_norm=10.0")
    strategy = CompressedFedAvg(cfg)
    msgs = round_messages(strategy, 1, strategy.initial_arrays())
    small = constant_message(strategy.template, 1e-6)
    big = constant_message(strategy.template, 1.0)  # norm sqrt(780,266) ~ 883
    strategy.aggregate_train(1, [reply(msgs[0], big)] + [reply(m, small) for m in msgs[1:]])
    assert [r["node"] for r in strategy.current.rejected] == [msgs[0].metadata.dst_node_id]
    assert "exceeds federation.max_update_norm 10" in strategy.current.rejected[0]["reason"]


@pytest.mark.parametrize("bad", [{"train-seconds": [1.0, 2.0]}, {"train-loss": float("nan")}, {"encode-seconds": -1.0},
                                 {"train-accuracy": float("inf")}])
def test_bad_metrics_are_a_rejected_reply(tmp_path, bad):
    cfg = tiny(tmp_path, "m")
    strategy = CompressedFedAvg(cfg)
    msgs = round_messages(strategy, 1, strategy.initial_arrays())
    good = model_to_message(make_model(cfg))
    new, _ = strategy.aggregate_train(1, [reply(msgs[0], good, **bad)] + [reply(m, good) for m in msgs[1:]])
    assert new is not None and len(strategy.current.rejected) == 1
    assert "bad metric" in strategy.current.rejected[0]["reason"]


def test_certificate_files_get_their_modes_whatever_was_there(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    for name in ("server.key.tmp", "server.key"):  # left behind world-readable
        (out / name).write_bytes(b"old")
        (out / name).chmod(0o644)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"not a key")
    (out / "ca.key").symlink_to(decoy)  # a link at a key's name is replaced, never written through
    old = os.umask(0)
    try:
        make_certs(out, nodes=1)
        make_certs(tmp_path / "fresh", nodes=1)
    finally:
        os.umask(old)
    for folder in (out, tmp_path / "fresh"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o022 == 0  # umask 000 made it 0777 before
        for key in ("ca.key", "server.key", "node_0.key"):
            assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600, key
        for public in ("ca.crt", "server.crt", "node_0.pub"):
            assert stat.S_IMODE((folder / public).stat().st_mode) == 0o644, public
    assert decoy.read_bytes() == b"not a key" and not (out / "ca.key").is_symlink()


@pytest.mark.parametrize("mode", ["model", "update"])
def test_one_poisoned_client_per_round_crashes_nothing_and_median_holds(tmp_path, cifar10, mode, bench_module):
    """bench/poisoning.py's attacker at a tiny scale: 1e30-scaled updates, one per round. FedAvg runs on
    (poisoned: the model is garbage, the clients' next replies fail and are rejected, every round completes);
    the median keeps the clean accuracy."""
    bench = bench_module("poisoning")
    runs = {name: (cfg, attack) for name, cfg, attack in bench.configs(tmp_path, rounds=3, images=60, test_images=200)
            if name.startswith(mode) and (attack in (None, "scale"))}
    results = {name: bench.one_run(cfg, attack) for name, (cfg, attack) in runs.items()}
    assert not any(r["crashed"] for r in results.values()), results
    assert results[f"{mode}_median_scale"]["poisoned_replies"] == 3  # one poisoned reply in every round
    assert results[f"{mode}_mean_scale"]["poisoned_replies"] >= 1  # (undefended, the clients fail after it)
    clean, robust = results[f"{mode}_median_clean"], results[f"{mode}_median_scale"]
    assert abs(robust["accuracy"] - clean["accuracy"]) <= 0.08, (clean, robust)
    assert results[f"{mode}_mean_scale"]["accuracy"] <= 0.2  # undefended: poisoned, as it should be


def test_a_board_agent_beyond_loopback_needs_a_token(tmp_path):
    """`python -m client_pynq serve --host <not loopback>` without a token used to start without a word."""
    import subprocess
    import sys

    from client_pynq.__main__ import exposure_problem, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.7") and not is_loopback("board.local")
    assert exposure_problem("127.0.0.1", None, False) is None
    assert exposure_problem("0.0.0.0", "s3cret", False) is None and exposure_problem("0.0.0.0", None, True) is None
    assert "without a token" in exposure_problem("0.0.0.0", None, False)
    # the command refuses before it binds anything
    r = subprocess.run([sys.executable, "-m", "client_pynq", "serve", "--synthetic", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "FEDFINN_BOARD_TOKEN": ""})
    assert r.returncode == 2 and "without a token" in r.stderr and "listening" not in r.stdout
