"""QONNX / FINN-ONNX export of every round: parity with PyTorch on real CIFAR-10 test images."""

import argparse
import sys

import numpy as np
import pytest
import torch

from export import NotDeployableError, export_round, finn_available, to_finn_onnx, to_qonnx
from fedfinn.export_commands import add_parser
from export.finn_export import FinnUnavailableError, match_quant_tie_rounding
from export.parity import TOLERANCE, parity, torch_logits
from training.models import build_model

DIAGONAL = [f"{f}-w{b}a{b}" for f in ("cnv", "resnet12-bn") for b in (1, 2, 4, 8)]
MIXED = ["cnv-w1a8", "cnv-w8a1", "resnet12-bn-w8a1"]
N_IMAGES = 64  # diagonal: every bit width of both families
N_MIXED = 8

needs_finn = pytest.mark.skipif(not finn_available(), reason="finn (finn-plus) is not installed: `make install-hw`")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibrated(name, data, seed=0, bits=32):
    """An untrained model whose BatchNorm statistics are the exact averages over 96 real training images."""
    from training.data import normalize

    torch.manual_seed(seed)
    model = build_model(name, 10, bits)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for i in range(2):
            model(normalize(data.train_x[48 * i : 48 * (i + 1)], data.mean, data.std))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def images_of(data, n):
    from training.data import normalize

    return normalize(data.test_x[:n], data.mean, data.std)


@pytest.fixture(scope="module")
def exported(cifar10, tmp_path_factory):
    """name -> (model, normalized images, PyTorch logits, qonnx path); exported once per module."""
    cache = {}

    def get(name, n):
        if name not in cache:
            torch.set_num_threads(1)
            model = calibrated(name, cifar10)
            x = images_of(cifar10, n)
            ref = torch_logits(model, x)
            assert np.ptp(ref) > 0, "the logits are constant: the parity test would mean nothing"
            path = tmp_path_factory.mktemp(name) / "round_001.onnx"
            to_qonnx(model, path)
            cache[name] = (model, x, ref, path)
        return cache[name]

    return get


def check(p):
    print(p.line())
    assert p.max_abs_diff <= TOLERANCE, p.line()
    assert p.top1_agreement == 1.0, p.line()


@pytest.mark.parametrize("name", DIAGONAL)
def test_qonnx_parity(name, exported):
    model, x, ref, path = exported(name, N_IMAGES)
    check(parity(model, path, x, "qonnx", ref))


@needs_finn
@pytest.mark.parametrize("name", DIAGONAL)
def test_finn_parity(name, exported):
    model, x, ref, path = exported(name, N_IMAGES)
    finn_path = path.with_name("finn.onnx")
    wrapper = to_finn_onnx(path, finn_path)
    ops = {n.op_type for n in wrapper.graph.node}
    assert "MultiThreshold" in ops and not {"Quant", "BipolarQuant"} & ops
    check(parity(model, finn_path, x, "finn", ref))


@pytest.mark.parametrize("name", MIXED)
def test_mixed_bit_widths(name, exported):
    model, x, ref, path = exported(name, N_MIXED)
    check(parity(model, path, x, "qonnx", ref))
    if finn_available():
        finn_path = path.with_name("finn.onnx")
        to_finn_onnx(path, finn_path)
        check(parity(model, finn_path, x, "finn", ref))


@needs_finn
def test_exact_ties_round_half_to_even(cifar10, tmp_path):
    """Inputs exactly on half steps of the input quantizer (2^-6): FINN's thresholds must round them to even."""
    from qonnx.core.modelwrapper import ModelWrapper

    from export.finn_export import _convert_qonnx_to_finn

    model = calibrated("cnv-w8a8", cifar10)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(-100, 100, (8, 3, 32, 32), generator=gen).float() + 0.5) * 2**-6
    ref = torch_logits(model, x)
    path = tmp_path / "q.onnx"
    to_qonnx(model, path)
    check(parity(model, path, x, "qonnx", ref))
    check(parity(model, to_finn_onnx(path, tmp_path / "f.onnx") and tmp_path / "f.onnx", x, "finn", ref))
    # without the correction, FINN's converter rounds every tie up: the logits differ
    raw = ModelWrapper(str(path)).transform(_convert_qonnx_to_finn()())
    raw.save(str(tmp_path / "raw.onnx"))
    assert parity(model, tmp_path / "raw.onnx", x, "finn", ref).max_abs_diff > TOLERANCE
    assert match_quant_tie_rounding(raw) > 0


def test_export_round_files_and_figures(cifar10, tmp_path):
    model = calibrated("cnv-w2a2", cifar10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = export_round(model, tmp_path, 7, model_name="cnv-w2a2", check_images=images_of(cifar10, 8))
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert result.qonnx_path == tmp_path / "qonnx" / "round_007.onnx" and result.qonnx_path.is_file()
    if finn_available():
        assert result.finn_path == tmp_path / "finn" / "round_007.onnx" and result.finn_path.is_file()
        assert [p.kind for p in result.parity] == ["qonnx", "finn"]
    assert result.ok and result.seconds > 0
    assert "export_qonnx_seconds" in result.summary()


# --- the study model ----------------------------------------------------------------

def test_study_model_exports_to_qonnx_but_not_to_finn(cifar10, tmp_path):
    model = calibrated("resnet12", cifar10, bits=4)
    result = export_round(model, tmp_path, 1, model_name="resnet12", check_images=images_of(cifar10, 16))
    assert result.finn_path is None and result.qonnx_path.is_file()  # finn=None: QONNX only
    check(result.parity[0])  # float activations: equal up to float rounding
    with pytest.raises(NotDeployableError) as err:
        to_finn_onnx(result.qonnx_path, tmp_path / "finn.onnx", what="model 'resnet12'")
    message = str(err.value)
    for word in ("GroupNorm", "float", "resnet12-bn-wXaY", "cnv-wXaY"):
        assert word in message
    assert not (tmp_path / "finn.onnx").exists()


def test_missing_finn_names_the_package_and_target(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "finn.transformation.qonnx.convert_qonnx_to_finn", None)
    model = build_model("cnv-w2a2").eval()
    to_qonnx(model, tmp_path / "q.onnx")
    with pytest.raises(FinnUnavailableError, match="make install-hw") as err:
        to_finn_onnx(tmp_path / "q.onnx", tmp_path / "f.onnx")
    assert "finn-plus" in str(err.value)


# --- fedfinn export RUN --------------------------------------------------------------

def make_run(tmp_path, data, name):
    from training.compress import model_to_message
    from training.config import from_dict

    cfg = from_dict({"model": {"name": name}, "compression": {"weight_bits": 32},
                     "run": {"name": "r", "out_dir": str(tmp_path)}})
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    model = calibrated(name, data, bits=cfg.compression.weight_bits)
    for rnd in (1, 3):
        (run_dir / "checkpoints" / f"round_{rnd:03d}.ffnc").write_bytes(model_to_message(model))
    return run_dir


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="fedfinn")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_exports_the_last_round(cifar10, tmp_path, capsys):
    run_dir = make_run(tmp_path, cifar10, "cnv-w2a2")
    assert run_cli(["export", str(run_dir), "--images", "8"]) == 0
    out = capsys.readouterr().out
    assert (run_dir / "qonnx" / "round_003.onnx").is_file()
    assert "qonnx parity on 8 images" in out
    if finn_available():
        assert (run_dir / "finn" / "round_003.onnx").is_file() and "finn  parity on 8 images" in out
    assert run_cli(["export", str(run_dir), "--round", "1", "--no-finn", "--images", "0"]) == 0
    assert (run_dir / "qonnx" / "round_001.onnx").is_file() and not (run_dir / "finn" / "round_001.onnx").exists()
    with pytest.raises(FileNotFoundError, match="checkpointed rounds: 1, 3"):
        run_cli(["export", str(run_dir), "--round", "2"])


def test_cli_refuses_finn_for_the_study_model(cifar10, tmp_path, capsys):
    run_dir = make_run(tmp_path, cifar10, "resnet12")
    assert run_cli(["export", str(run_dir), "--images", "0"]) == 2
    err = capsys.readouterr().err
    assert "GroupNorm" in err and "resnet12-bn-wXaY" in err
    assert (run_dir / "qonnx" / "round_003.onnx").is_file()  # the QONNX half is done first
