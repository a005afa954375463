"""The deployable models (cnv-wXaY, resnet12-bn-wXaY): registry, training, codec, stability."""

import itertools

import numpy as np
import pytest
import torch

from training import codec
from training.compress import _quant_layers, load_values, message_to_model, model_to_message, model_to_tensors
from training.models import MODEL_NAMES, build_model, check_model_name, is_deployable, parse_deployable
from training.models.deploy_layers import BatchNorm1d, BatchNorm2d, residual_bits
from training.pruning import prune_
from training.strategy import weighted_average

BITS = (1, 2, 4, 8)
FAMILIES = ("cnv", "resnet12-bn")
ALL = [f"{f}-w{w}a{a}" for f, w, a in itertools.product(FAMILIES, BITS, BITS)]
EXPECTED_PARAMETERS = {"cnv": 1_546_688, "resnet12-bn": 780_256}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- registry ---------------------------------------------------------------------

def test_registry_names():
    assert MODEL_NAMES[0] == "resnet12"
    assert set(ALL) <= set(MODEL_NAMES) and len(MODEL_NAMES) == 1 + len(ALL)
    assert all(is_deployable(n) for n in ALL)
    assert not is_deployable("resnet12")
    assert parse_deployable("resnet12-bn-w2a4") == ("resnet12-bn", 2, 4)
    for bad in ("cnv-w3a3", "cnv-w2", "cnv", "resnet12-bn", "cnv-w2a2x", "vgg"):
        assert not is_deployable(bad)
        with pytest.raises(ValueError, match="unknown model") as err:
            check_model_name(bad)
        assert "cnv-wXaY" in str(err.value) and "resnet12-bn-wXaY" in str(err.value)


def test_weight_bits_argument_is_ignored_for_deployable_models():
    a = build_model("cnv-w2a2", 10, 8)
    b = build_model("cnv-w2a2", 10, 32)
    for m in (a, b):
        assert {int(layer.quant_weight().bit_width) for layer in _quant_layers(m).values()} == {2}
    assert int(build_model("resnet12", 10, 4).blocks[0].conv1.quant_weight().bit_width) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_and_cifar100(family):
    m = build_model(f"{family}-w4a4", 100)
    assert sum(p.numel() for p in m.parameters()) == EXPECTED_PARAMETERS[family] + 90 * (512 if family == "cnv" else 160)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sum(p.numel() for p in build_model(f"{family}-w4a4").parameters()) == EXPECTED_PARAMETERS[family]


def test_cnv_layout_follows_bnn_pynq():
    m = build_model("cnv-w1a1")
    convs = [mod for mod in m.features if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    assert all(c.padding == (0, 0) and c.kernel_size == (3, 3) for c in convs)
    fcs = [mod for mod in m.classifier if isinstance(mod, torch.nn.Linear)]
    assert [f.out_features for f in fcs] == [512, 512, 10] and fcs[0].in_features == 256
    assert all(mod.bias is None for mod in convs + fcs)


def test_resnet_residual_quantizer_is_shared():
    m = build_model("resnet12-bn-w4a4")
    for block in m.blocks:
        assert isinstance(block.bn1, BatchNorm2d)
        assert isinstance(block.shortcut[1], BatchNorm2d)
        assert not any(isinstance(mod, torch.nn.GroupNorm) for mod in block.modules())
    assert residual_bits(1) == 2 and residual_bits(4) == 4


# --- training ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_builds_and_trains_a_step(name):
    torch.manual_seed(0)
    m = build_model(name)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    out = m(x)
    assert out.shape == (4, 10)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [k for k, v in m.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("running_mean") for k in changed)  # BatchNorm statistics moved
    assert any("conv" in k or "features.0" in k for k in changed)  # first conv weights learned
    _, w, _ = parse_deployable(name)
    for layer in _quant_layers(m).values():
        qw = layer.quant_weight()
        assert int(qw.bit_width) == w
        assert torch.equal(qw.value, qw.int().float() * qw.scale)
    m.eval()
    assert torch.isfinite(m(x)).all()


# --- codec -------------------------------------------------------------------------

def _powers_of_two(t: np.ndarray) -> bool:
    e = np.log2(t)
    return bool(np.all(e == np.round(e)))


@pytest.mark.parametrize("name", ["cnv-w1a1", "cnv-w2a4", "cnv-w4a2", "cnv-w8a8",
                                  "resnet12-bn-w1a2", "resnet12-bn-w2a1", "resnet12-bn-w4a8", "resnet12-bn-w8a4"])
def test_codec_round_trip_is_exact(name):
    torch.manual_seed(1)
    m = build_model(name)
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 32, 32))  # non-trivial BatchNorm statistics
    _, w, _ = parse_deployable(name)
    tensors = model_to_tensors(m)
    quant = _quant_layers(m)
    assert set(quant) == {k for k, v in tensors.items() if isinstance(v, codec.QTensor)}
    for key, q in tensors.items():
        if not isinstance(q, codec.QTensor):
            assert q.dtype == np.float32
            continue
        assert q.bits == w
        lim = 2 ** (w - 1) - 1
        values = set(np.unique(q.codes).tolist())
        assert values <= ({-1, 1} if w == 1 else set(range(-lim, lim + 1)))
        out_ch = q.codes.shape[0]
        last = key in ("classifier.6.weight", "head.weight")
        assert q.scale.shape == (() if last else (out_ch,))
        assert _powers_of_two(q.scale)
    blob = model_to_message(m)
    fresh = build_model(name)
    message_to_model(fresh, blob)
    for key in quant:
        a, b = quant[key].quant_weight(), _quant_layers(fresh)[key].quant_weight()
        assert torch.equal(a.int(), b.int()) and torch.equal(a.scale, b.scale)
    sd_a, sd_b = m.state_dict(), fresh.state_dict()
    for k, v in sd_a.items():
        if v.is_floating_point() and k not in quant:
            assert torch.equal(v, sd_b[k]), k
    m.eval(), fresh.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))


# --- server re-quantization ----------------------------------------------------------

@pytest.mark.parametrize("name,prune", [(n, p) for n in ("cnv-w1a1", "cnv-w2a2", "cnv-w4a4", "cnv-w8a8",
                                                          "resnet12-bn-w1a4", "resnet12-bn-w2a2",
                                                          "resnet12-bn-w4a1", "resnet12-bn-w8a8")
                                        for p in (0.0, 0.6)])
def test_requantization_is_stable(name, prune):
    """Client decodes codes*scale into float weights; the server re-quantizes them: same codes, same scale."""
    torch.manual_seed(2)
    a = build_model(name)
    with torch.no_grad():  # channels of very different magnitudes, as after training
        for layer in _quant_layers(a).values():
            layer.weight.mul_(torch.exp(torch.randn(layer.weight.shape[0], *[1] * (layer.weight.dim() - 1))))
    masks = prune_(a, prune) if prune else None
    blob = model_to_message(a, masks)
    b = build_model(name)
    message_to_model(b, blob)  # the client's float weights are now codes * scale
    masks_b = prune_(b, prune) if prune else None  # the server prunes again at the same rate
    again = model_to_message(b, masks_b)
    if not prune:
        assert again == blob  # byte-identical downlink
    decoded, decoded_again = codec.decode_values(blob), codec.decode_values(again)
    assert all(np.array_equal(decoded[k], decoded_again[k]) for k in decoded)
    # FedAvg of three identical client replies re-quantizes to the same codes and scales
    c = build_model(name)
    load_values(c, weighted_average([decoded] * 3, [50, 70, 90]))
    for key, layer in _quant_layers(c).items():
        qb, qc = _quant_layers(b)[key].quant_weight(), layer.quant_weight()
        assert torch.equal(qb.int(), qc.int()) and torch.equal(qb.scale, qc.scale), key
    # and a small perturbation (what a tiny local step does) keeps the scales
    with torch.no_grad():
        for layer in _quant_layers(c).values():
            layer.weight.mul_(1 + 1e-4)
    for key, layer in _quant_layers(c).items():
        assert torch.equal(_quant_layers(b)[key].quant_weight().scale, layer.quant_weight().scale), key


# --- BatchNorm ------------------------------------------------------------------------

def test_eval_batchnorm_matches_torch():
    torch.manual_seed(3)
    for bn, shape in ((BatchNorm2d(16), (8, 16, 5, 5)), (BatchNorm1d(16), (8, 16))):
        ref = torch.nn.BatchNorm2d(16) if isinstance(bn, BatchNorm2d) else torch.nn.BatchNorm1d(16)
        with torch.no_grad():
            for t in (bn, ref):
                t.weight.copy_(torch.linspace(0.5, 2, 16))
                t.bias.copy_(torch.linspace(-1, 1, 16))
        x = torch.randn(shape) * 3 + 1
        bn.train(), ref.train()
        assert torch.equal(bn(x), ref(x))  # training mode is torch's own
        assert torch.equal(bn.running_var, ref.running_var)
        bn.eval(), ref.eval()
        assert torch.allclose(bn(x), ref(x), atol=1e-5)  # eval: same formula, ONNX Runtime's rounding
