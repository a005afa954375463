"""Model registry: one file per model family, one name per model.

``build_model(name, num_classes, weight_bits)`` is the only way the rest of
the project makes a model; ``check_model_name`` validates a name up front.

* ``resnet12``: the poster's study model (GroupNorm, float activations);
  its weight bits come from the run's ``compression.weight_bits``.
* ``cnv-wXaY``: BNN-PYNQ's CNV for FINN (``cnv.py``).
* ``resnet12-bn-wXaY``: ResNet-12 with BatchNorm, quantized ReLUs and a
  streamable quantized residual (``resnet12_bn.py``).

For the deployable models (``is_deployable``) X = weight bits and Y =
activation bits, each in {1, 2, 4, 8}, come from the name; the
``weight_bits`` argument (the run's ``compression.weight_bits``) is ignored
for them, so one name fixes everything the hardware build depends on.
Their weights are always quantized: every message carries integer codes.
"""

from __future__ import annotations

import re

from torch import nn

DEPLOY_BITS = (1, 2, 4, 8)
DEPLOYABLE_FAMILIES = ("cnv", "resnet12-bn")
MODEL_NAMES = ("resnet12",) + tuple(
    f"{family}-w{w}a{a}" for family in DEPLOYABLE_FAMILIES for w in DEPLOY_BITS for a in DEPLOY_BITS
)
_DEPLOYABLE = re.compile(r"^(cnv|resnet12-bn)-w(\d+)a(\d+)$")


def parse_deployable(name: str) -> tuple[str, int, int] | None:
    """(family, weight bits, activation bits) of a valid deployable name, else None."""
    m = _DEPLOYABLE.match(name)
    if m is None or name not in MODEL_NAMES:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3))


def is_deployable(name: str) -> bool:
    """True for the models FINN can compile (cnv-wXaY, resnet12-bn-wXaY)."""
    return parse_deployable(name) is not None


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        bits = "|".join(map(str, DEPLOY_BITS))
        raise ValueError(
            f"unknown model {name!r}; known: resnet12 (study model), "
            f"cnv-wXaY and resnet12-bn-wXaY (deployable; X = weight bits, Y = activation bits, "
            f"each one of {bits}, e.g. cnv-w2a2)"
        )


def build_model(name: str, num_classes: int = 10, weight_bits: int = 32) -> nn.Module:
    """A fresh model. ``weight_bits`` applies to ``resnet12`` only (see module doc)."""
    check_model_name(name)
    if name == "resnet12":
        from .resnet12 import ResNet12

        return ResNet12(num_classes=num_classes, weight_bits=weight_bits)
    family, w, a = parse_deployable(name)
    if family == "cnv":
        from .cnv import CNV

        return CNV(num_classes=num_classes, weight_bits=w, act_bits=a)
    from .resnet12_bn import ResNet12BN

    return ResNet12BN(num_classes=num_classes, weight_bits=w, act_bits=a)


def spread_batchnorm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running means drawn in [-0.5, 0.5) and variances in [0.5, 1.5), in place.

    A freshly built model's statistics (0 and 1) fold into thresholds that are nearly all alike,
    which would hide errors a trained model shows; tests and hardware estimates use this instead.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = mod.num_features
                mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model
