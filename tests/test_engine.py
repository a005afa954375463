"""The engine: devices, threads, the evaluation that overlaps training, checkpoints and exact resumes.

CUDA-only branches are guarded: on a machine without CUDA the device plumbing is checked with
``train.device = "cpu"``, ``"auto"`` (which must pick the CPU) and the ``spawn`` worker path that a GPU
run takes.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from fedfinn.cli import main as fedfinn_main
from test_federated import tiny
from training import loop
from training.config import ConfigError, load_config
from training.recorder import checkpoint_rounds, drop_spare_state, read_metrics, state_path
from training.runner import InProcessGrid, run
from training.client_app import app as client_app
from training.server_app import serve
from training.task import device_of


def checkpoints(run_dir) -> dict[int, str]:
    return {p: hashlib.sha256((run_dir / "checkpoints" / f"round_{p:03d}.ffnc").read_bytes()).hexdigest()
            for p in checkpoint_rounds(run_dir)}


def metrics(run_dir, keys=("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down", "clients")):
    return [{k: r[k] for k in keys} for r in read_metrics(run_dir)]


def test_device_choice_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 'auto' picks it")
    assert device_of(tiny(tmp_path, "a")).type == "cpu"  # auto
    assert device_of(tiny(tmp_path, "c", "train.device=\"cpu\"")).type == "cpu"
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        device_of(tiny(tmp_path, "g", "train.device=\"cuda:0\""))
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, ["train.device=\"gpu\""])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_trains_on_the_gpu(tmp_path, cifar10):
    cfg = tiny(tmp_path, "cuda", "train.device=\"cuda\"", "federation.backend=\"parallel\"")
    rows = read_metrics(run(cfg, progress=False))
    assert len(rows) == 2 and rows[-1]["test_accuracy"] > 0


def test_explicit_cpu_equals_auto_and_bf16_is_ignored_on_cpu(tmp_path, cifar10):
    """train.device = "cpu" and bf16 on the CPU change nothing: same checkpoints, same metrics as auto."""
    if torch.cuda.is_available():
        pytest.skip("auto is CUDA here")
    a = run(tiny(tmp_path, "auto"), progress=False)
    b = run(tiny(tmp_path, "cpu", "train.device=\"cpu\"", "train.bf16=true"), progress=False)
    assert checkpoints(a) == checkpoints(b) and metrics(a) == metrics(b)


def test_overlapped_evaluation_records_exactly_what_a_sequential_one_does(tmp_path, cifar10):
    on = run(tiny(tmp_path, "on", "federation.rounds=3"), progress=False)
    off = run(tiny(tmp_path, "off", "federation.rounds=3", "run.overlap_eval=false"), progress=False)
    assert checkpoints(on) == checkpoints(off)
    assert metrics(on) == metrics(off)
    rows = read_metrics(on)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["seconds"]["evaluate"] > 0 and r["seconds"]["round"] > 0 for r in rows)


def test_spawned_workers_train_exactly_like_forked_ones(tmp_path, cifar10):
    """The worker path a GPU run takes (spawn: CUDA does not survive a fork) gives the forked run's models."""
    results = {}
    for method in ("fork", "spawn"):
        cfg = tiny(tmp_path, method, "federation.backend=\"parallel\"")
        cfg.run_dir.mkdir(parents=True)
        (cfg.run_dir / "config.toml").write_text(cfg.to_toml())
        grid = InProcessGrid(client_app, cfg.federation.num_clients, workers=2, start_method=method)
        try:
            results[method] = serve(grid, cfg, progress=False, eval_threads=1)
        finally:
            grid.close()
    assert checkpoints(results["fork"]) == checkpoints(results["spawn"])
    assert metrics(results["fork"]) == metrics(results["spawn"])


def stop_after(run_dir, done: int) -> None:
    """Leave ``run_dir`` as a run stopped after round ``done`` leaves it (later lines and files gone)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:done]))
    for r in checkpoint_rounds(run_dir):
        if r > done:
            (run_dir / "checkpoints" / f"round_{r:03d}.ffnc").unlink()
            state_path(run_dir, r).unlink(missing_ok=True)
    (run_dir / "summary.json").unlink()


@pytest.mark.parametrize("backend", ["inprocess", "parallel"])
def test_update_mode_resume_is_bit_exact(tmp_path, cifar10, backend):
    """Stopped after round 2 and resumed in a new process state, an update-mode run ends with the
    uninterrupted run's models: the server's per-node copies and the nodes' copies + residuals are
    saved with each checkpoint (before, the server reset every copy to the initial model)."""
    extra = ["compression.update=\"delta\"", "compression.update_density=0.3", "compression.update_density_down=0.3",
             "compression.update_bits=4", "federation.rounds=4", "federation.fraction_train=0.6",
             f"federation.backend=\"{backend}\""]
    whole = run(tiny(tmp_path, "whole", *extra), progress=False)
    expected_ckpt, expected_rows = checkpoints(whole), metrics(whole)
    assert state_path(whole, 2).exists()
    stop_after(whole, 2)
    resumed = run(tiny(tmp_path, "whole", *extra), progress=False, resume=True)
    assert checkpoints(resumed) == expected_ckpt
    assert metrics(resumed) == expected_rows
    assert all(r["rejected"] == [] for r in read_metrics(resumed))  # no node had to start over


def test_keep_checkpoints_keeps_the_newest_and_a_run_still_resumes(tmp_path, cifar10):
    cfg = tiny(tmp_path, "k", "federation.rounds=3", "run.keep_checkpoints=1")
    run_dir = run(cfg, progress=False)
    assert checkpoint_rounds(run_dir) == [3]
    cfg4 = tiny(tmp_path, "k", "federation.rounds=3", "run.keep_checkpoints=1")
    assert run(cfg4, progress=False, resume=True) == run_dir  # nothing left to do, nothing lost
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_train_sums_on_the_device_equal_a_python_loop(cifar10):
    """The loss and accuracy summed on the device (no per-step sync) equal float(loss) summed in Python."""
    from training.models import build_model

    x, y = cifar10.train_x[:60], cifar10.train_y[:60]
    torch.manual_seed(0)
    model = build_model("resnet12", 10, 32)
    ref_model = build_model("resnet12", 10, 32)
    ref_model.load_state_dict(model.state_dict())
    result = loop.train(model, x, y, epochs=1, lr=0.01, batch_size=20, seed=3, mean=cifar10.mean, std=cifar10.std)
    # the same steps, reading the loss back every step as the old loop did
    gen = torch.Generator().manual_seed(3)
    xa = loop.normalize(x, cifar10.mean, cifar10.std)
    ya = torch.as_tensor(y)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.01)
    ref_model.train()
    total, correct = 0.0, 0
    order = torch.randperm(len(xa), generator=gen)
    for i in range(0, 60, 20):
        idx = order[i : i + 20]
        xb = loop.augment(xa[idx], gen)
        opt.zero_grad()
        out = ref_model(xb)
        loss = torch.nn.functional.cross_entropy(out, ya[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * 20
        correct += int((out.argmax(1) == ya[idx]).sum())
    assert result.loss == total / 60 and result.accuracy == correct / 60
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


def test_channels_last_trains_the_same_model_up_to_rounding(cifar10):
    """NHWC convolutions (train.channels_last) are not bit-identical to NCHW, only close."""
    from training.models import build_model

    x, y = cifar10.train_x[:40], cifar10.train_y[:40]
    models = []
    for cl in (False, True):
        torch.manual_seed(0)
        m = build_model("resnet12", 10, 32)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        loop.train(m, x, y, epochs=1, lr=0.01, batch_size=20, seed=1, mean=cifar10.mean, std=cifar10.std,
                   channels_last=cl)
        models.append({k: v.detach().contiguous() for k, v in m.state_dict().items()})
    diffs = [float((models[0][k].float() - models[1][k].float()).abs().max()) for k in models[0]]
    assert max(diffs) < 1e-2


def test_spare_update_state_is_dropped_and_the_run_still_resumes(tmp_path, cifar10):
    """``fedfinn run --drop-spare-state``: an unfinished update-mode run keeps only the state its resume
    reads (and resumes bit for bit from it); a finished one keeps none."""
    extra = ["compression.update=\"delta\"", "compression.update_density=0.3", "compression.update_bits=4",
             "federation.rounds=4", "federation.fraction_train=0.6"]
    whole = run(tiny(tmp_path, "whole", *extra), progress=False)
    expected_ckpt, expected_rows = checkpoints(whole), metrics(whole)
    stop_after(whole, 3)
    assert drop_spare_state(whole, 4) == [state_path(whole, 1), state_path(whole, 2)]
    assert state_path(whole, 3).exists()
    assert fedfinn_main(["run", str(whole / "config.toml"), "--resume", "--drop-spare-state", "--quiet"]) == 0
    assert checkpoints(whole) == expected_ckpt and metrics(whole) == expected_rows
    assert all(r["rejected"] == [] for r in read_metrics(whole))  # resumed from round 3's state: no start-over
    assert not any(state_path(whole, r).exists() for r in range(1, 5))  # finished: no state left
