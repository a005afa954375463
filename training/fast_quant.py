"""Integer codes and scale of a Brevitas weight quantizer, computed directly from the weight.

``layer.quant_weight().int()`` walks ~30 Brevitas modules per layer and then
checks the result's validity with a second pass (``torch.unique`` at 1 bit);
for the small models here that costs far more than the arithmetic itself.
:func:`weight_codes` reads the quantizer's configuration once from its module
tree, accepts it only if every module is one whose arithmetic is written out
below, and then computes the same codes and the same float32 scale with a few
numpy/torch operations. Any other configuration returns ``None`` and the
caller uses Brevitas's own path (``training.compress``), so an unknown
quantizer is never approximated.

Kinds and formulas (``w`` the float32 weight, ``m`` the quantizer's
``scaling_min_val``, ``T = 2^(b-1) - 1``; per channel = over axis 0 with the
view ``w.reshape(C, -1)``; "torch" means the very op Brevitas applies, on a
tensor of the same shape, so even a last-ulp rounding is reproduced):

* integer (``RescalingIntQuant``, narrow signed ``b``-bit, ``IntScaling``,
  zero zero-point, ``AbsMax``/``AbsMaxDetached`` statistics):

  - ``a = max|w|`` computed as ``max(max w, -min w)``: a max is exact in any
    order, so this equals ``torch.max(torch.abs(w))`` bit for bit;
  - float scale (``Int8WeightPerTensorFloat``): ``scale = max(a, m) / T``
    (one IEEE float32 division, torch);
  - power-of-two scale (``PoTWeight*``): ``scale = max(2^round(log2 max(a, m)), m)
    / 2^round(log2 T)`` (torch ``log2``, ``round``, ``2.0 **``);
  - ``codes = clip(rint(w / scale), -T, T)``: IEEE division and
    round-half-even, as Brevitas's ``x / scale`` and ``torch.round``; the
    clamp is Brevitas's ``tensor_clamp``.

* binary (``ClampedBinaryQuant``, ``AbsAve``/``AbsAveNonZero`` statistics):

  - the statistic is Brevitas's own stats module applied to the same view
    (a mean depends on the summation order, so it is not re-implemented);
  - ``scale`` is the same restriction as above with threshold 1;
  - ``codes = +1 where w >= 0 else -1``: Brevitas clamps to ``[-scale, scale]``
    (sign-preserving for ``scale > 0``) and takes ``binary_sign``
    (``x >= 0``, so -0.0 gives +1).

Why the codes equal ``QuantTensor.int()``: Brevitas stores ``value = code *
scale`` (float32) and ``int()`` returns ``round(value / scale)``. For ``|code|
<= 127`` and a normal ``code * scale`` the two roundings move the quotient by
less than ``127 * 2^-23`` (exactly 1 at 1 bit: ``s / s``), so the integer
comes back. The fast path therefore requires every scale in ``[2^-100,
2^100]`` and returns ``None`` otherwise (also for NaN/Inf, where Brevitas
raises). ``int()`` also refuses a binary tensor whose codes are all equal
(``torch.unique`` finds one value); such a tensor returns ``None`` too, so the
caller gets Brevitas's behaviour.

Determinism: the torch ops are the ones Brevitas calls, on tensors of the same
shape, dtype and layout, in the same process; the numpy ops are exact
(max/min, IEEE division, rint, clip, comparisons). Only CPU float32 weights
take the fast path. ``tests/test_fast_quant.py`` checks equality against
Brevitas for every model family and bit width, on random, trained, tied, tiny,
zero and pruned weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["weight_codes", "weight_spec", "WeightSpec"]

_SCALE_MIN = 2.0**-100  # scales outside [2^-100, 2^100]: Brevitas's path (see the module doc)
_SCALE_MAX = 2.0**100

_types: dict | None = None


def _brevitas_types() -> dict:
    """The Brevitas (and project) classes the fast path understands, imported once."""
    global _types
    if _types is None:
        from brevitas.core.bit_width import BitWidthConst
        from brevitas.core.function_wrapper import (
            Identity, LogTwo, OverOutputChannelView, OverTensorView, PowerOfTwo, RoundSte,
            ScalarSignedClampMinSte, TensorClamp, TensorClampSte,
        )
        from brevitas.core.function_wrapper.misc import Abs
        from brevitas.core.quant import ClampedBinaryQuant, IntQuant, RescalingIntQuant
        from brevitas.core.quant.delay import _NoDelay
        from brevitas.core.restrict_val import (
            FloatRestrictValue, PowerOfTwoRestrictValue, _ClampValue, _RestrictClampValue,
        )
        from brevitas.core.scaling import IntScaling
        from brevitas.core.scaling.runtime import StatsFromParameterScaling, _StatsScaling
        from brevitas.core.stats import AbsAve, AbsMax
        from brevitas.core.stats.stats_wrapper import _ParameterListStats, _Stats
        from brevitas.core.stats.view_wrapper import _ViewParameter
        from brevitas.core.zero_point import ZeroZeroPoint
        from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjector

        from .models.deploy_layers import AbsAveNonZero, AbsMaxDetached

        _types = dict(locals())
    return _types


class WeightSpec:
    """What the fast path needs of one layer's weight quantizer (see the module doc)."""

    __slots__ = ("kind", "bits", "pot", "per_channel", "stats_shape", "min_stat", "min_scale", "stats")

    def __init__(self, kind, bits, pot, per_channel, stats_shape, min_stat, min_scale, stats):
        self.kind = kind  # "int" or "binary"
        self.bits = bits
        self.pot = pot  # power-of-two restricted scale (else float)
        self.per_channel = per_channel
        self.stats_shape = stats_shape  # Brevitas's shape of the statistic (and of the scale)
        self.min_stat = min_stat  # clamp of the statistic before the restriction
        self.min_scale = min_scale  # clamp after the restriction
        self.stats = stats  # Brevitas's _Stats module (binary kinds call it)


def _is(obj, name: str) -> bool:
    return type(obj) is _brevitas_types()[name]


def _sub(module, name: str):
    """A submodule by name straight from ``_modules`` (None if absent: then no type check passes)."""
    modules = getattr(module, "_modules", None)
    return modules.get(name) if modules is not None else None


def _clamp_min_val(module) -> float | None:
    """min_val of a ScalarSignedClampMinSte (positive), else None."""
    if not _is(module, "ScalarSignedClampMinSte"):
        return None
    val = float(module.min_val)
    return val if val > 0 else None


def _restriction(ssi) -> tuple[bool, float, float] | None:
    """(power of two?, min before, min after) of a _StatsScaling we can reproduce, else None."""
    if not _is(ssi, "_StatsScaling") or not _is(_sub(ssi, "affine_rescaling"), "Identity"):
        return None
    rcs, rct = _sub(ssi, "restrict_clamp_scaling"), _sub(ssi, "restrict_clamp_threshold")
    rcst = _sub(ssi, "restrict_clamp_scale_threshold")
    if not (_is(rcs, "_RestrictClampValue") and _is(rct, "_RestrictClampValue") and _is(rcst, "_RestrictClampValue")):
        return None
    if not (_is(_sub(rct, "clamp_ste"), "Identity") and _is(_sub(rcst, "clamp_ste"), "Identity")
            and _is(_sub(rcst, "restrict_value_impl"), "Identity")):
        return None
    restrict, same = _sub(rcs, "restrict_value_impl"), _sub(rct, "restrict_value_impl")
    if type(same) is not type(restrict):
        return None
    if _is(restrict, "FloatRestrictValue"):
        pot, pre = False, "Abs"
        if not (_is(_sub(restrict, "apply_abs"), "Abs") and _is(_sub(same, "apply_abs"), "Abs")):
            return None
    elif _is(restrict, "PowerOfTwoRestrictValue"):
        pot, pre = True, "LogTwo"
        for r in (restrict, same):
            if not (_is(_sub(r, "float_to_int_impl"), "RoundSte") and _is(_sub(r, "power_of_two"), "PowerOfTwo")):
                return None
    else:
        return None
    if not (_is(_sub(ssi, "restrict_scaling_pre"), pre) and _is(_sub(ssi, "restrict_threshold_pre"), pre)):
        return None
    clamp_scaling = _sub(ssi, "clamp_scaling")
    if not _is(clamp_scaling, "_ClampValue"):
        return None
    min_stat = _clamp_min_val(_sub(clamp_scaling, "clamp_min_ste"))
    min_scale = _clamp_min_val(_sub(rcs, "clamp_ste"))
    if min_stat is None or min_scale is None:
        return None  # without a floor a zero tensor divides by zero: leave it to Brevitas
    return pot, min_stat, min_scale


def _stats_config(scaling, max_stats: bool) -> tuple[bool, tuple[int, ...], nn.Module] | None:
    """(per channel?, statistic shape, _Stats module) of a StatsFromParameterScaling, else None."""
    if not _is(scaling, "StatsFromParameterScaling"):
        return None
    pls = _sub(scaling, "parameter_list_stats")
    if not _is(pls, "_ParameterListStats") or pls.extra_tracked_params_list is not None:
        return None
    first, stats = _sub(pls, "first_tracked_param"), _sub(pls, "stats")
    if not _is(first, "_ViewParameter") or not _is(stats, "_Stats"):
        return None
    view = _sub(first, "view_shape_impl")
    if _is(view, "OverTensorView"):
        per_channel, reduce_dim = False, None
    elif _is(view, "OverOutputChannelView") and _is(_sub(view, "permute_impl"), "Identity"):
        per_channel, reduce_dim = True, 1
    else:
        return None
    impl = _sub(stats, "stats_impl")
    kinds = ("AbsMax", "AbsMaxDetached") if max_stats else ("AbsAve", "AbsAveNonZero")
    if not any(_is(impl, k) for k in kinds) or impl.stats_reduce_dim != reduce_dim:
        return None
    if _is(impl, "AbsMax") and impl.keepdim:
        return None
    return per_channel, tuple(stats.stats_output_shape), stats


def _scalar_const(module) -> float | None:
    """Value of a BitWidthConst / zero-point constant, else None."""
    try:
        value = module()
    except Exception:  # noqa: BLE001 - anything unexpected: not ours
        return None
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


def weight_spec(layer: nn.Module) -> WeightSpec | None:
    """The layer's weight quantizer as a :class:`WeightSpec`, or None if the fast path does not know it."""
    proxy = _sub(layer, "weight_quant")
    if not _is(proxy, "WeightQuantProxyFromInjector") or not proxy.is_quant_enabled:
        return None
    if proxy.export_mode or getattr(proxy, "requires_quant_input", True):
        return None
    tq = _sub(proxy, "tensor_quant")
    if _is(tq, "RescalingIntQuant"):
        if tq.observer_only:
            return None
        iq = _sub(tq, "int_quant")
        if not (_is(iq, "IntQuant") and iq.signed and iq.narrow_range
                and _is(_sub(iq, "float_to_int_impl"), "RoundSte")
                and (_is(_sub(iq, "tensor_clamp_impl"), "TensorClampSte")
                     or _is(_sub(iq, "tensor_clamp_impl"), "TensorClamp"))
                and _is(_sub(iq, "input_view_impl"), "Identity")
                and _is(_sub(_sub(iq, "delay_wrapper"), "delay_impl"), "_NoDelay")):
            return None
        isc = _sub(tq, "int_scaling_impl")
        if not (_is(isc, "IntScaling") and isc.signed is True and isc.narrow_range is True):
            return None
        zp = _sub(tq, "zero_point_impl")
        if not _is(zp, "ZeroZeroPoint") or _scalar_const(_sub(zp, "zero_point")) != 0.0:
            return None
        bw = _sub(tq, "msb_clamp_bit_width_impl")
        bits = _scalar_const(bw) if _is(bw, "BitWidthConst") else None
        if bits is None or bits != int(bits) or not 2 <= bits <= 8:
            return None
        kind, max_stats = "int", True
    elif _is(tq, "ClampedBinaryQuant"):
        clamp = _sub(tq, "tensor_clamp_impl")
        if not (_is(_sub(_sub(tq, "delay_wrapper"), "delay_impl"), "_NoDelay")
                and (_is(clamp, "TensorClamp") or _is(clamp, "TensorClampSte"))
                and _is(_sub(tq, "bit_width"), "BitWidthConst") and _scalar_const(_sub(tq, "bit_width")) == 1.0):
            return None
        kind, max_stats, bits = "binary", False, 1
    else:
        return None
    scaling = _sub(tq, "scaling_impl")
    stats = _stats_config(scaling, max_stats)
    restriction = _restriction(_sub(scaling, "stats_scaling_impl")) if stats is not None else None
    if restriction is None:
        return None
    per_channel, stats_shape, stats_module = stats
    pot, min_stat, min_scale = restriction
    return WeightSpec(kind, int(bits), pot, per_channel, stats_shape, min_stat, min_scale, stats_module)


_thresholds: dict[tuple[int, bool], torch.Tensor] = {}


def _threshold(bits: int, pot: bool) -> torch.Tensor:
    """Brevitas's restricted integer threshold: T (float scale) or 2^round(log2 T) (power of two)."""
    key = (bits, pot)
    if key not in _thresholds:
        t = torch.tensor(float(2 ** (bits - 1) - 1)) if bits > 1 else torch.ones(1)
        if pot:
            t = 2.0 ** torch.round(torch.log2(t))
        else:
            t = torch.abs(torch.abs(t))
        _thresholds[key] = t
    return _thresholds[key]


def _scale(stat: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """_StatsScaling.forward for a nonnegative statistic, op for op."""
    s = torch.clamp_min(stat, spec.min_stat)
    if spec.pot:
        s = 2.0 ** torch.round(torch.log2(s))
    s = torch.clamp_min(s, spec.min_scale)
    return s / _threshold(spec.bits, spec.pot)


@torch.no_grad()
def weight_codes(layer: nn.Module, spec: WeightSpec | None = None) -> tuple[np.ndarray, int, np.ndarray] | None:
    """(int8 codes shaped like the weight, bits, float32 scale) as Brevitas computes them, or None.

    The scale has shape () per tensor and (C,) per channel. None: the quantizer
    is not one the fast path reproduces, or the weight is not CPU float32, or
    the result is a case Brevitas treats specially (see the module doc).
    """
    spec = weight_spec(layer) if spec is None else spec
    if spec is None:
        return None
    weight = layer.weight
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    w_t = weight.detach()
    if w_t.dim() == 0 or w_t.numel() == 0 or (spec.per_channel and w_t.dim() < 2):
        return None
    w = w_t.numpy()
    rows = w.reshape(w.shape[0], -1) if spec.per_channel else w.reshape(-1)
    if spec.kind == "int":
        if spec.per_channel:
            top, bottom = rows.max(axis=1), rows.min(axis=1)
        else:
            top, bottom = rows.max(), rows.min()
        absmax = np.maximum(top, -bottom)  # == max|w|, exactly; NaN propagates
        stat = torch.from_numpy(np.ascontiguousarray(absmax, dtype=np.float32)).view(spec.stats_shape)
    else:
        stat = spec.stats(w_t.reshape(rows.shape)).view(spec.stats_shape)
    scale_t = _scale(stat, spec)
    scale = scale_t.numpy().astype(np.float32, copy=False)
    lo, hi = float(scale.min()), float(scale.max())
    if not (_SCALE_MIN <= lo and hi <= _SCALE_MAX):  # also False for NaN
        return None
    if spec.kind == "int":
        top_code = np.float32(2 ** (spec.bits - 1) - 1)
        y = np.divide(w, scale if scale.ndim == 0 else scale.reshape((-1,) + (1,) * (w.ndim - 1)))
        np.rint(y, out=y)
        np.clip(y, -top_code, top_code, out=y)
        codes = y.astype(np.int8)
    else:
        positive = np.greater_equal(w, np.float32(0))
        n_pos = int(np.count_nonzero(positive))
        if n_pos == 0 or n_pos == positive.size:
            return None  # one code value only: Brevitas's int() refuses it
        codes = positive.view(np.int8)
        codes = codes + codes
        codes -= 1
    flat_scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
    return codes, spec.bits, flat_scale
