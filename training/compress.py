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
from brevitas import config as brevitas_config
from brevitas.core.utils import StatelessBuffer
from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from torch import nn

from . import codec, fast_quant


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict weight name -> Brevitas layer whose weight is quantized."""
    return _walk(model, state=False)[1]


def _quant_enabled(module: nn.Module) -> bool:
    return bool(getattr(getattr(module, "weight_quant", None), "is_quant_enabled", False))


_type_info: dict[type, tuple[str | None, bool]] = {}


def _info(cls: type) -> tuple[str | None, bool]:
    """(how ``_walk`` reproduces the class's own ``state_dict`` contribution, has ``quant_weight``).

    "plain": nn.Module's; "stateless": Brevitas StatelessBuffer's (its ``value`` buffer is dropped);
    "proxy": Brevitas quant proxies' (nothing at all while ``IGNORE_PROXY_KEYS`` is set); None:
    anything else (another override, extra state): the module's own ``state_dict`` is called."""
    info = _type_info.get(cls)
    if info is None:
        kind = None
        if (cls._save_to_state_dict is nn.Module._save_to_state_dict
                and getattr(cls, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state):
            kind = {nn.Module.state_dict: "plain", StatelessBuffer.state_dict: "stateless",
                    QuantProxyFromInjector.state_dict: "proxy"}.get(cls.state_dict)
            owner = {"stateless": StatelessBuffer, "proxy": QuantProxyFromInjector}.get(kind)
            if owner is not None and _next_state_dict(cls, owner) is not nn.Module.state_dict:
                kind = None  # their super().state_dict() must be nn.Module's
        info = _type_info[cls] = (kind, hasattr(cls, "quant_weight"))
    return info


def _next_state_dict(cls: type, owner: type):
    """What ``super(owner, self).state_dict`` resolves to for an instance of ``cls``."""
    mro = cls.__mro__
    for klass in mro[mro.index(owner) + 1:]:
        if "state_dict" in klass.__dict__:
            return klass.__dict__["state_dict"]
    return None


def _walk(model: nn.Module, state: bool = True, detach: bool = True
          ) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """(``model.state_dict()``'s floating entries, ``_quant_layers``) in one pass over the modules.

    Equal to ``{k: v for k, v in model.state_dict().items() if v.is_floating_point()}`` (same keys,
    order and detached tensors) and to scanning ``model.named_modules()`` (same names, first-visit
    naming of shared modules), without the per-module call overhead of both: a Brevitas model has
    hundreds of quantizer submodules that hold no travelling state. If any module's ``state_dict``
    is one this does not reproduce (another override, hooks, extra state), the state is taken
    from ``model.state_dict()`` itself. ``detach=False`` leaves the walked tensors undetached (the
    caller detaches what it uses). ``tests/test_fast_quant.py`` checks the equality on every model
    family.
    """
    ignore_proxies = bool(brevitas_config.IGNORE_PROXY_KEYS.get())
    dest: dict[str, torch.Tensor] = {}
    quant: dict[str, nn.Module] = {}
    seen: set[int] = set()
    fallback = False  # a module this walk does not reproduce: take model.state_dict() itself
    stack: list[tuple[str, nn.Module, bool]] = [("", model, state)]
    pop, push, seen_add, info_of = stack.pop, stack.append, seen.add, _type_info.get
    qw = "quant_weight"
    while stack:
        path, module, with_state = pop()
        cls = type(module)
        kind, has_method = info_of(cls) or _info(cls)
        mid = id(module)
        if mid not in seen:
            seen_add(mid)
            # hasattr(module, "quant_weight"): the class (cached), then where nn.Module.__getattr__ looks
            if (has_method or qw in module.__dict__ or qw in module._parameters or qw in module._buffers
                    or qw in module._modules) and _quant_enabled(module):
                quant[f"{path}.weight"] = module
        elif not with_state:
            continue  # named_modules() does not enter a shared module twice (state_dict() does)
        if with_state and not fallback:
            params, buffers = module._parameters, module._buffers
            if kind is None or module._state_dict_hooks or module._state_dict_pre_hooks \
                    or type(params) is not dict or type(buffers) is not dict:
                fallback = True
            elif kind == "proxy" and ignore_proxies:
                with_state = False  # QuantProxyFromInjector.state_dict adds nothing of its subtree
            elif params or buffers:
                prefix = f"{path}." if path else ""
                for name, param in params.items():
                    if param is not None and param.is_floating_point():
                        dest[prefix + name] = param.detach() if detach else param
                if buffers:
                    skip = module._non_persistent_buffers_set
                    for name, buf in buffers.items():
                        if (buf is not None and name not in skip and buf.is_floating_point()
                                and not (kind == "stateless" and name == "value")):
                            dest[prefix + name] = buf.detach() if detach else buf
        children = module._modules
        if children:
            for name, child in reversed(children.items()):
                if child is not None:
                    push((f"{path}.{name}" if path else name, child, with_state))
    if state and fallback:
        dest = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    return dest, quant


def _brevitas_codes(layer: nn.Module) -> tuple[np.ndarray, int, np.ndarray]:
    """Brevitas's own path: ``quant_weight()`` then ``QuantTensor.int()`` (slow; the reference)."""
    with torch.no_grad():
        qw = layer.quant_weight()
        codes = qw.int().cpu().numpy().astype(np.int8)
        scale = qw.scale.detach().cpu().numpy().astype(np.float32)
        bits = int(qw.bit_width.item())
    scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
    return codes, bits, scale


def _qtensor(layer: nn.Module, mask: torch.Tensor | None, fast: bool = True) -> codec.QTensor:
    """The layer's weight as codes + scale: computed directly (``training.fast_quant``, bit-identical)
    when the quantizer is one it knows, else (or with ``fast=False``) through Brevitas."""
    direct = fast_quant.weight_codes(layer) if fast else None
    codes, bits, scale = direct if direct is not None else _brevitas_codes(layer)
    np_mask = None
    if mask is not None and not bool(mask.all()):
        np_mask = mask.cpu().numpy()
        codes = codes * np_mask  # pruned entries carry no code
    return codec.QTensor(codes=codes, bits=bits, scale=scale, mask=np_mask)


def travelling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating entries of the state dict: what a message carries."""
    return _walk(model)[0]


def travelling_values(model: nn.Module) -> dict[str, np.ndarray]:
    """The travelling state as float32 numpy arrays (update mode computes with these)."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in travelling_state(model).items()}


def model_to_tensors(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, quantize: bool = True,
                     fast: bool = True) -> dict:
    """Codec tensors of the model; ``quantize=False`` sends every tensor as fp32.

    ``fast=False`` takes every quantized layer through Brevitas's ``quant_weight().int()``
    (the reference the fast path is tested against; the result is the same)."""
    state, quant = _walk(model, detach=False)  # detached below, only what is converted
    quant = quant if quantize else {}
    masks = masks or {}
    tensors: dict = {}
    for name, value in state.items():
        if name in quant:
            tensors[name] = _qtensor(quant[name], masks.get(name), fast=fast)
        else:
            tensors[name] = value.detach().cpu().numpy().astype(np.float32, copy=False)
    return tensors


def model_to_message(model: nn.Module, masks=None, level: int = 3, quantize: bool = True, entropy: bool = True,
                     fast: bool = True) -> bytes:
    return codec.encode(model_to_tensors(model, masks, quantize, fast=fast), level=level, entropy=entropy)


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
