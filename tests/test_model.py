import pytest
import torch

from training.models import build_model
from training.models.resnet12 import EXPECTED_PARAMETERS
from training.pruning import prune_, prunable_weights, sparsity


@pytest.mark.parametrize("bits", [32, 8, 4, 1])
def test_resnet12_size_matches_poster(bits):
    model = build_model("resnet12", 10, bits)
    n = sum(p.numel() for p in model.parameters())
    assert n == EXPECTED_PARAMETERS == 780_266
    assert round(n * 4 / 2**20, 3) == 2.976
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet12_cifar100_head():
    assert build_model("resnet12", 100, 32)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("bits,levels", [(8, 255), (4, 15), (1, 2)])
def test_quantized_weights_use_the_bit_width(bits, levels):
    model = build_model("resnet12", 10, bits)
    qw = model.blocks[1].conv2.quant_weight()
    codes = qw.int()
    assert codes.unique().numel() <= levels
    assert int(qw.bit_width) == bits
    # the layer computes with exactly codes * scale
    assert torch.equal(qw.value, codes.float() * qw.scale)
    if bits == 1:
        assert set(codes.unique().tolist()) == {-1, 1}
        assert torch.allclose(qw.scale.flatten(), model.blocks[1].conv2.weight.abs().mean().reshape(1))
    else:
        assert torch.allclose(qw.scale, model.blocks[1].conv2.weight.abs().max() / (2 ** (bits - 1) - 1))


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 10, 32)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9, 0.99])
def test_global_pruning_rate(rate):
    torch.manual_seed(0)
    model = build_model("resnet12", 10, 32)
    masks = prune_(model, rate)
    assert abs(sparsity(model) - rate) < 1e-3
    for name, w in prunable_weights(model).items():
        assert torch.equal(w == 0, ~masks[name])
    # norms are never pruned
    assert (model.blocks[0].norm1.weight != 0).all()


def test_global_threshold_differs_from_per_layer():
    torch.manual_seed(0)
    a, b = build_model("resnet12", 10, 32), build_model("resnet12", 10, 32)
    b.load_state_dict(a.state_dict())
    prune_(a, 0.5, "global")
    prune_(b, 0.5, "layer")
    first_a = float((a.blocks[0].conv1.weight == 0).float().mean())
    first_b = float((b.blocks[0].conv1.weight == 0).float().mean())
    assert abs(first_b - 0.5) < 0.01
    assert abs(first_a - 0.5) > 0.05  # the small first layer has larger weights: pruned less globally


def test_prune_rate_out_of_range():
    with pytest.raises(ValueError):
        prune_(build_model("resnet12", 10, 32), 1.0)
