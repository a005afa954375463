"""Unstructured magnitude pruning of conv and linear weights.

One global threshold over all prunable weights by default (the smallest
``rate`` fraction of |w| across the model is zeroed), or one threshold per
layer. Pruning zeroes the float weights in place and returns the keep-masks;
the codec then sends only the survivors. The client prunes after local
training; the server prunes the aggregated model at the same rate.
"""

from __future__ import annotations

import torch
from torch import nn


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict name -> weight parameter of every conv and linear layer."""
    out = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):  # Brevitas Quant layers subclass these
            out[f"{mod_name}.weight"] = module.weight
    return out


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values, k).values


@torch.no_grad()
def prune_(model: nn.Module, rate: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Zero the ``rate`` fraction of smallest-magnitude weights; return keep-masks."""
    if not 0 <= rate < 1:
        raise ValueError(f"prune rate must be in [0, 1), got {rate}")
    weights = prunable_weights(model)
    if rate == 0:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    if scope == "global":
        magnitudes = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        k = int(rate * magnitudes.numel())
        threshold = _kth_smallest(magnitudes, k) if k > 0 else None
        thresholds = {name: threshold for name in weights}
    elif scope == "layer":
        thresholds = {}
        for name, w in weights.items():
            k = int(rate * w.numel())
            thresholds[name] = _kth_smallest(w.detach().abs().flatten(), k) if k > 0 else None
    else:
        raise ValueError(f"prune scope must be global or layer, got {scope!r}")
    masks = {}
    for name, w in weights.items():
        t = thresholds[name]
        mask = torch.ones_like(w, dtype=torch.bool) if t is None else w.abs() > t
        w.masked_fill_(~mask, 0.0)  # +0.0: a product would leave -0.0, which the codec must keep
        masks[name] = mask
    return masks


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the prunable weights."""
    weights = prunable_weights(model).values()
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))
