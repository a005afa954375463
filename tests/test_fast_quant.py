"""The direct quantized-weight path (training.fast_quant) equals Brevitas's quant_weight().int(), bit for bit.

Every model family and weight bit width, on random init, after real SGD steps,
on weights built to hit rounding ties, on tiny, zero, huge and pruned tensors;
the whole message (``model_to_message``) is compared byte for byte with the
Brevitas path (``fast=False``). Quantizers the fast path does not know fall
back to Brevitas. One test breaks the fast path on purpose and checks that
the comparison notices.
"""

import numpy as np
import pytest
import torch
from torch import nn

from training import codec, compress, fast_quant
from training.models import build_model
from training.pruning import prune_

STUDY = [("resnet12", 8), ("resnet12", 4), ("resnet12", 1)]
DEPLOY = [(f"{family}-w{w}a{a}", 32) for family in ("cnv", "resnet12-bn") for w, a in ((1, 1), (2, 2), (4, 2), (8, 4))]
ALL = STUDY + DEPLOY


def _model(name, bits, seed=0):
    torch.manual_seed(seed)
    return build_model(name, 10, bits)


def _brevitas(layer):
    """Brevitas's own codes, bits, scale (the reference)."""
    return compress._brevitas_codes(layer)


def _assert_layer_matches(name, layer):
    fast = fast_quant.weight_codes(layer)
    assert fast is not None, f"{name}: the fast path should know this quantizer"
    codes, bits, scale = fast
    ref_codes, ref_bits, ref_scale = _brevitas(layer)
    assert bits == ref_bits, name
    assert codes.dtype == np.int8 and codes.shape == ref_codes.shape, name
    assert scale.dtype == np.float32 and scale.shape == ref_scale.shape, name
    assert scale.tobytes() == ref_scale.tobytes(), f"{name}: scale differs"
    mismatch = np.count_nonzero(codes != ref_codes)
    assert mismatch == 0, f"{name}: {mismatch} codes differ"


def _assert_model_matches(model, masks=None):
    layers = compress._quant_layers(model)
    assert layers
    for name, layer in layers.items():
        _assert_layer_matches(name, layer)
    assert compress.model_to_message(model, masks) == compress.model_to_message(model, masks, fast=False)


@pytest.mark.parametrize("name,bits", ALL)
def test_random_init_matches_brevitas(name, bits):
    _assert_model_matches(_model(name, bits))


@pytest.mark.parametrize("name,bits", [("resnet12", 4), ("cnv-w2a2", 32), ("resnet12-bn-w1a2", 32)])
def test_trained_weights_match_brevitas(name, bits, cifar10):
    """A few SGD steps (large learning rate) on real images move the weights off their init."""
    from training import data as data_mod

    model = _model(name, bits)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = data_mod.normalize(cifar10.train_x[:48], cifar10.mean, cifar10.std)
    y = torch.as_tensor(cifar10.train_y[:48])
    model.train()
    for step in range(3):
        idx = slice(16 * step, 16 * step + 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    _assert_model_matches(model)


@torch.no_grad()
def _set_tied_weights(model, seed=0):
    """Weights that sit exactly on (and one ulp next to) half steps of their own scale.

    Every quantized tensor gets values (k + 1/2) * s with s a power of two and the largest
    magnitude T * s, so that the scale Brevitas computes is s itself (T * s / T for a float
    scale; 2^round(log2(T s)) / 2^(b-1) = s for a power-of-two one) and w / s lands on k + 1/2:
    round-half-to-even decides every code. Some entries are moved one ulp either way.
    """
    rng = np.random.default_rng(seed)
    for layer in compress._quant_layers(model).values():
        w = layer.weight
        spec = fast_quant.weight_spec(layer)
        top = 2 ** (spec.bits - 1) - 1 if spec.bits > 1 else 1
        s = np.float32(2.0 ** rng.integers(-9, -3))
        k = rng.integers(-top, top, size=w.shape).astype(np.float32)
        vals = (k + np.float32(0.5)) * s
        flat = vals.reshape(-1)
        nudge = rng.random(flat.size)
        flat[nudge < 0.1] = np.nextafter(flat[nudge < 0.1], np.float32(np.inf))
        flat[nudge > 0.9] = np.nextafter(flat[nudge > 0.9], np.float32(-np.inf))
        vals.reshape(w.shape[0], -1)[:, 0] = top * s  # the largest magnitude of every row is T * s
        w.copy_(torch.from_numpy(vals))


@pytest.mark.parametrize("name,bits", ALL)
def test_rounding_ties_match_brevitas(name, bits):
    model = _model(name, bits)
    _set_tied_weights(model)
    _assert_model_matches(model)


@pytest.mark.parametrize("name,bits", [("resnet12", 8), ("resnet12", 1), ("cnv-w4a2", 32), ("resnet12-bn-w1a1", 32)])
@pytest.mark.parametrize("magnitude", [1e-12, 3e-8, 1e6])
def test_tiny_and_large_weights_match_brevitas(name, bits, magnitude):
    """Below scaling_min_val (1e-10) the scale floor takes over; far above, nothing changes."""
    model = _model(name, bits)
    with torch.no_grad():
        for layer in compress._quant_layers(model).values():
            layer.weight.mul_(magnitude / layer.weight.abs().max())
    _assert_model_matches(model)


@pytest.mark.parametrize("name,bits", [("resnet12", 4), ("cnv-w2a2", 32), ("cnv-w8a8", 32)])
def test_zero_rows_and_zero_tensors_match_brevitas(name, bits):
    model = _model(name, bits)
    layers = list(compress._quant_layers(model).values())
    with torch.no_grad():
        layers[0].weight.zero_()
        layers[1].weight[::3] = 0.0  # whole output channels
        layers[2].weight[0] = -0.0
    _assert_model_matches(model)


def test_a_binary_tensor_of_one_sign_goes_to_brevitas():
    """int() refuses a binary tensor with a single code value; the fast path leaves it to Brevitas."""
    model = _model("cnv-w1a1", 32)
    layer = list(compress._quant_layers(model).values())[1]
    with torch.no_grad():
        layer.weight.abs_()
    assert fast_quant.weight_spec(layer) is not None
    assert fast_quant.weight_codes(layer) is None
    with pytest.raises(RuntimeError, match="not valid"):
        compress.model_to_message(model)
    with pytest.raises(RuntimeError, match="not valid"):
        compress.model_to_message(model, fast=False)


@pytest.mark.parametrize("name,bits", [("resnet12", 4), ("resnet12", 1), ("cnv-w2a2", 32), ("resnet12-bn-w8a8", 32)])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruned_models_match_brevitas(name, bits, scope):
    model = _model(name, bits)
    masks = prune_(model, 0.6, scope)
    _assert_model_matches(model, masks)
    # and the pruned message decodes to what the layers compute with
    values = compress.decode_for(model, compress.model_to_message(model, masks))
    for wname, layer in compress._quant_layers(model).items():
        with torch.no_grad():
            expect = layer.quant_weight().value.numpy() * masks[wname].numpy()
        np.testing.assert_array_equal(values[wname], expect)


def test_huge_and_nonfinite_weights_fall_back_to_brevitas():
    model = _model("resnet12", 8)
    layer = list(compress._quant_layers(model).values())[0]
    with torch.no_grad():
        layer.weight.mul_(1e33 / layer.weight.abs().max())  # scale ~ 8e30 > 2^100
    assert fast_quant.weight_codes(layer) is None
    assert compress.model_to_message(model) == compress.model_to_message(model, fast=False)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("nan")
    assert fast_quant.weight_codes(layer) is None
    with pytest.raises((RuntimeError, ValueError)):
        compress.model_to_message(model)


def _unknown_layers():
    from brevitas.inject.enum import ScalingImplType
    from brevitas.nn import QuantConv2d, QuantLinear
    from brevitas.quant import Int8WeightPerTensorFloat, SignedBinaryWeightPerTensorConst
    from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint

    class LearnedScale(Int8WeightPerTensorFloat):
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS

    return [
        QuantConv2d(4, 8, 3, bias=False, weight_quant=Int8WeightPerChannelFixedPoint),  # ceil, not round
        QuantConv2d(4, 8, 3, bias=False, weight_quant=SignedBinaryWeightPerTensorConst),  # constant scale
        QuantLinear(16, 8, bias=False, weight_quant=LearnedScale),  # learned scale parameter
    ]


@pytest.mark.parametrize("index", range(3))
def test_unknown_quantizers_fall_back_to_brevitas(index):
    torch.manual_seed(index)
    layer = _unknown_layers()[index]
    assert fast_quant.weight_spec(layer) is None
    model = nn.Sequential(layer)
    tensors = compress.model_to_tensors(model)
    codes, bits, scale = _brevitas(layer)
    q = tensors["0.weight"]
    assert isinstance(q, codec.QTensor) and np.array_equal(q.codes, codes) and q.scale.tobytes() == scale.tobytes()
    assert compress.model_to_message(model) == compress.model_to_message(model, fast=False)


def test_other_bit_widths_and_shapes():
    """Bit widths the models do not use (2..7 study, 3..7 deployable) and linear/1x1 layers."""
    from brevitas.nn import QuantConv2d, QuantLinear

    from training.models.deploy_layers import weight_quant
    from training.models.quant import weight_quant_kwargs

    torch.manual_seed(3)
    layers = []
    for bits in range(2, 8):
        layers.append(QuantConv2d(3, 5, 1, bias=False, **weight_quant_kwargs(bits)))
        layers.append(QuantLinear(7, 3, bias=True, **weight_quant_kwargs(bits)))
        for per_channel in (True, False):
            kwargs = weight_quant(2, per_channel)
            kwargs["weight_bit_width"] = bits
            layers.append(QuantConv2d(3, 6, 3, bias=False, **kwargs))
            layers.append(QuantLinear(9, 4, bias=False, **kwargs))
    for per_channel in (True, False):
        layers.append(QuantLinear(1, 1, bias=False, **weight_quant(1, per_channel)))
    for i, layer in enumerate(layers):
        with torch.no_grad():
            layer.weight.mul_(10.0 ** (i % 5 - 2))
        if layer.weight.numel() == 1:
            with torch.no_grad():
                layer.weight.fill_(-0.3)  # a single weight: one code value, Brevitas refuses it
            assert fast_quant.weight_codes(layer) is None
            continue
        _assert_layer_matches(f"layer {i}", layer)


def test_a_wrong_fast_path_is_caught(monkeypatch):
    """The comparison is sharp: a scale one ulp off, or one code off, fails it."""
    model = _model("cnv-w2a2", 32)
    _assert_model_matches(model)
    real_scale = fast_quant._scale
    monkeypatch.setattr(fast_quant, "_scale", lambda stat, spec: np.nextafter(
        real_scale(stat, spec), np.float32(np.inf)))
    with pytest.raises(AssertionError, match="scale differs"):
        _assert_model_matches(model)
    assert compress.model_to_message(model) != compress.model_to_message(model, fast=False)
    monkeypatch.setattr(fast_quant, "_scale", real_scale)
    real_codes = fast_quant.weight_codes

    def off_by_one(layer, spec=None):
        out = real_codes(layer, spec)
        codes = out[0].copy()
        codes.reshape(-1)[7] = 1 if codes.reshape(-1)[7] != 1 else 0
        return codes, out[1], out[2]

    monkeypatch.setattr(fast_quant, "weight_codes", off_by_one)
    with pytest.raises(AssertionError, match="1 codes differ"):
        _assert_model_matches(model)
    assert compress.model_to_message(model) != compress.model_to_message(model, fast=False)


# --- the one-pass walk over the modules ------------------------------------------------------


def _reference_quant_layers(model):
    out = {}
    for name, module in model.named_modules():
        proxy = getattr(module, "weight_quant", None)
        if hasattr(module, "quant_weight") and getattr(proxy, "is_quant_enabled", False):
            out[f"{name}.weight"] = module
    return out


def _assert_walk_matches(model):
    ref = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    state, quant = compress._walk(model)
    assert list(state) == list(ref)
    for k, v in ref.items():
        assert state[k].data_ptr() == v.data_ptr() and state[k].shape == v.shape and not state[k].requires_grad
    ref_quant = _reference_quant_layers(model)
    assert list(quant) == list(ref_quant) and all(quant[k] is ref_quant[k] for k in ref_quant)
    assert list(compress._quant_layers(model)) == list(ref_quant)


@pytest.mark.parametrize("name,bits", ALL + [("resnet12", 32)])
def test_walk_equals_state_dict_and_named_modules(name, bits):
    _assert_walk_matches(_model(name, bits))


def test_walk_with_shared_modules_hooks_and_odd_buffers():
    from brevitas import config
    from brevitas.nn import QuantConv2d

    from training.models.quant import weight_quant_kwargs

    torch.manual_seed(0)
    shared = QuantConv2d(3, 3, 1, bias=True, **weight_quant_kwargs(4))
    def drop(key):
        def hook(module, sd, prefix, meta):
            del sd[prefix + key]  # returns None: the state dict is edited in place
        return hook

    hooked = nn.Linear(4, 4)
    hooked._register_state_dict_hook(drop("bias"))
    odd = nn.BatchNorm1d(4)
    odd.register_buffer("scratch", torch.zeros(2), persistent=False)
    odd.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    model = nn.Sequential(shared, nn.Sequential(shared, hooked), odd, shared, nn.Identity())
    model.add_module("none", None)
    _assert_walk_matches(model)
    assert "1.1.bias" not in compress.travelling_state(model)
    assert "2.scratch" not in compress.travelling_state(model)
    token = config.IGNORE_PROXY_KEYS.set(True)
    try:
        _assert_walk_matches(model)
    finally:
        config.IGNORE_PROXY_KEYS.reset(token)
    root_hooked = nn.Sequential(nn.Linear(2, 2))
    root_hooked._register_state_dict_hook(drop("0.weight"))
    _assert_walk_matches(root_hooked)
