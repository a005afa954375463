"""Between a model and a wire message: what each client and the server send.

``model_to_message`` turns a model's state into codec tensors and bytes:
quantized layers (Brevitas QuantConv2d / QuantLinear with a weight
quantizer) travel as their integer codes + scale, exactly what the layer
computes with; every other floating tensor travels as fp32 (pruned weights
become sparse automatically). Integer buffers (BatchNorm's
``num_batches_tracked``) do not travel. ``message_to_model`` is the inverse:
the decoded values are loaded into the model's state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import codec


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict weight name -> Brevitas layer whose weight is quantized."""
    out = {}
    for name, module in model.named_modules():
        proxy = getattr(module, "weight_quant", None)
        if hasattr(module, "quant_weight") and getattr(proxy, "is_quant_enabled", False):
            out[f"{name}.weight"] = module
    return out


def _qtensor(layer: nn.Module, mask: torch.Tensor | None) -> codec.QTensor:
    with torch.no_grad():
        qw = layer.quant_weight()
        codes = qw.int().cpu().numpy().astype(np.int8)
        scale = qw.scale.detach().cpu().numpy().astype(np.float32)
        bits = int(qw.bit_width.item())
    scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
    np_mask = None
    if mask is not None and not bool(mask.all()):
        np_mask = mask.cpu().numpy()
        codes = codes * np_mask  # pruned entries carry no code
    return codec.QTensor(codes=codes, bits=bits, scale=scale, mask=np_mask)


def travelling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating entries of the state dict: what a message carries."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def travelling_values(model: nn.Module) -> dict[str, np.ndarray]:
    """The travelling state as float32 numpy arrays (update mode computes with these)."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in travelling_state(model).items()}


def model_to_tensors(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, quantize: bool = True) -> dict:
    """Codec tensors of the model; ``quantize=False`` sends every tensor as fp32."""
    quant = _quant_layers(model) if quantize else {}
    masks = masks or {}
    tensors: dict = {}
    for name, value in travelling_state(model).items():
        if name in quant:
            tensors[name] = _qtensor(quant[name], masks.get(name))
        else:
            tensors[name] = value.detach().cpu().numpy().astype(np.float32, copy=False)
    return tensors


def model_to_message(model: nn.Module, masks=None, level: int = 3, quantize: bool = True, entropy: bool = True) -> bytes:
    return codec.encode(model_to_tensors(model, masks, quantize), level=level, entropy=entropy)


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in travelling_state(model).items()}


def decode_for(model: nn.Module, blob: bytes) -> dict[str, np.ndarray]:
    """Decode a message that must fit ``model`` exactly (names and shapes)."""
    shapes = expected_shapes(model)
    values = codec.decode_values(blob, expected=shapes, max_bytes=codec.max_body_bytes(shapes))
    for name, value in values.items():
        if not np.isfinite(value).all():
            raise codec.CodecError(f"tensor {name!r} holds NaN or Inf")
    return values


@torch.no_grad()
def load_values(model: nn.Module, values: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    for name, value in values.items():
        # np.array (not ascontiguousarray, which makes 0-d arrays 1-d) keeps scalars scalar
        state[name].copy_(torch.from_numpy(np.array(value, copy=True)).reshape(state[name].shape))


def message_to_model(model: nn.Module, blob: bytes) -> None:
    load_values(model, decode_for(model, blob))
