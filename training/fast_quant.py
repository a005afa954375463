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
    (Brevitas's clamps are ``max(x, m)`` for ``x >= 0`` and its division is
    one IEEE float32 division: numpy gives the same bits);
  - power-of-two scale (``PoTWeight*``): ``scale = max(2^round(log2 max(a, m)), m)
    / 2^round(log2 T)``; ``log2`` and ``2.0 **`` are torch's (a libm-style
    function may round differently from another one), ``round`` is
    round-half-even (``np.rint`` == ``torch.round``);
  - ``codes = clip(rint(w / scale), -T, T)``: IEEE division and
    round-half-even, as Brevitas's ``x / scale`` and ``torch.round``; the
    clamp is Brevitas's ``tensor_clamp``. With a float scale it never acts:
    ``scale = fl(a / T)`` is within 2^-24 of ``a / T``, so ``|w| / scale <=
    a / scale <= T (1 + 2^-23)`` and rounds to at most T (a floor ``m > a``
    only makes the quotient smaller); it is skipped there. With a power-of-two
    scale ``a / scale <= sqrt(2) 2^(b-1)`` (at most 91 for b <= 7), so below 8
    bits the clamp is applied to the int8 codes instead of the floats.

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
(max/min, IEEE division, rint, clip, comparisons, casts of integral values).
Only CPU float32 weights
take the fast path. ``tests/test_fast_quant.py`` checks equality against
Brevitas for every model family and bit width, on random, trained, tied, tiny,
zero and pruned weights.
"""

from __future__ import annotations

import numpy as np
import torch
from brevitas.core.bit_width import BitWidthConst
from brevitas.core.function_wrapper import (
    Identity, LogTwo, OverOutputChannelView, OverTensorView, PowerOfTwo, RoundSte, ScalarSignedClampMinSte,
    TensorClamp, TensorClampSte,
)
from brevitas.core.function_wrapper.misc import Abs
from brevitas.core.quant import ClampedBinaryQuant, IntQuant, RescalingIntQuant
from brevitas.core.quant.delay import _NoDelay
from brevitas.core.restrict_val import FloatRestrictValue, PowerOfTwoRestrictValue, _ClampValue, _RestrictClampValue
from brevitas.core.scaling import IntScaling
from brevitas.core.scaling.runtime import StatsFromParameterScaling, _StatsScaling
from brevitas.core.stats import AbsAve, AbsMax
from brevitas.core.stats.stats_wrapper import _ParameterListStats, _Stats
from brevitas.core.stats.view_wrapper import _ViewParameter
from brevitas.core.zero_point import ZeroZeroPoint
from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjector
from torch import nn

from .models.deploy_layers import AbsAveNonZero, AbsMaxDetached

__all__ = ["weight_codes", "weight_spec", "WeightSpec"]

_SCALE_MIN = 2.0**-100  # scales outside [2^-100, 2^100]: Brevitas's path (see the module doc)
_SCALE_MAX = 2.0**100

_CLAMPS = (TensorClamp, TensorClampSte)  # the clamps whose arithmetic is the same for weights


class WeightSpec:
    """What the fast path needs of one layer's weight quantizer (see the module doc)."""

    __slots__ = ("kind", "bits", "pot", "per_channel", "stats_shape", "min_stat", "min_scale", "stats_impl")

    def __init__(self, kind, bits, pot, per_channel, stats_shape, min_stat, min_scale, stats_impl):
        self.kind = kind  # "int" or "binary"
        self.bits = bits
        self.pot = pot  # power-of-two restricted scale (else float)
        self.per_channel = per_channel
        self.stats_shape = stats_shape  # Brevitas's shape of the statistic (and of the scale)
        self.min_stat = min_stat  # clamp of the statistic before the restriction
        self.min_scale = min_scale  # clamp after the restriction
        self.stats_impl = stats_impl  # Brevitas's statistic module (binary kinds call it)


def _min_val(clamp) -> float | None:
    """min_val of a ScalarSignedClampMinSte (positive), else None."""
    if type(clamp) is not ScalarSignedClampMinSte:
        return None
    val = float(clamp.min_val)
    return val if val > 0 else None


def _const(module) -> float | None:
    """Value of a one-element constant module (BitWidthConst, StatelessBuffer), else None."""
    try:
        value = module()
    except Exception:  # noqa: BLE001 - anything unexpected: not ours
        return None
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


def weight_spec(layer: nn.Module) -> WeightSpec | None:
    """The layer's weight quantizer as a :class:`WeightSpec`, or None if the fast path does not know it.

    Every module on the way is checked by exact type (a subclass could change the arithmetic);
    submodules are read from ``_modules`` directly, and a missing one ends the check (None).
    """
    try:
        return _weight_spec(layer)
    except (AttributeError, KeyError, TypeError):
        return None


def _weight_spec(layer: nn.Module) -> WeightSpec | None:
    proxy = layer._modules["weight_quant"]
    if type(proxy) is not WeightQuantProxyFromInjector or not proxy.is_quant_enabled:
        return None
    if proxy.export_mode or getattr(proxy, "requires_quant_input", True):
        return None
    tq = proxy._modules["tensor_quant"]
    sub = tq._modules
    if type(tq) is RescalingIntQuant:
        if tq.observer_only:
            return None
        iq = sub["int_quant"]
        iqs = iq._modules
        if not (type(iq) is IntQuant and iq.signed is True and iq.narrow_range is True
                and type(iqs["float_to_int_impl"]) is RoundSte
                and type(iqs["tensor_clamp_impl"]) in _CLAMPS
                and type(iqs["input_view_impl"]) is Identity
                and type(iqs["delay_wrapper"]._modules["delay_impl"]) is _NoDelay):
            return None
        isc = sub["int_scaling_impl"]
        if not (type(isc) is IntScaling and isc.signed is True and isc.narrow_range is True):
            return None
        zp = sub["zero_point_impl"]
        if type(zp) is not ZeroZeroPoint or _const(zp._modules["zero_point"]) != 0.0:
            return None
        bw = sub["msb_clamp_bit_width_impl"]
        bits = _const(bw) if type(bw) is BitWidthConst else None
        if bits is None or bits != int(bits) or not 2 <= bits <= 8:
            return None
        kind, stat_types = "int", (AbsMax, AbsMaxDetached)
    elif type(tq) is ClampedBinaryQuant:
        bw = sub["bit_width"]
        if not (type(sub["delay_wrapper"]._modules["delay_impl"]) is _NoDelay
                and type(sub["tensor_clamp_impl"]) in _CLAMPS
                and type(bw) is BitWidthConst and _const(bw) == 1.0):
            return None
        kind, bits, stat_types = "binary", 1, (AbsAve, AbsAveNonZero)
    else:
        return None
    # statistic: StatsFromParameterScaling over one tracked weight, viewed whole or per output channel
    scaling = sub["scaling_impl"]
    if type(scaling) is not StatsFromParameterScaling:
        return None
    pls = scaling._modules["parameter_list_stats"]
    if type(pls) is not _ParameterListStats or pls.extra_tracked_params_list is not None:
        return None
    first, stats = pls._modules["first_tracked_param"], pls._modules["stats"]
    if type(first) is not _ViewParameter or type(stats) is not _Stats:
        return None
    view = first._modules["view_shape_impl"]
    if type(view) is OverTensorView:
        per_channel, reduce_dim = False, None
    elif type(view) is OverOutputChannelView and type(view._modules["permute_impl"]) is Identity:
        per_channel, reduce_dim = True, 1
    else:
        return None
    impl = stats._modules["stats_impl"]
    if type(impl) not in stat_types or impl.stats_reduce_dim != reduce_dim:
        return None
    if type(impl) is AbsMax and impl.keepdim:
        return None
    # scale: _StatsScaling with a float (abs) or power-of-two restriction and positive floors
    ssi = scaling._modules["stats_scaling_impl"]
    if type(ssi) is not _StatsScaling:
        return None
    ssm = ssi._modules
    rcs, rct = ssm["restrict_clamp_scaling"], ssm["restrict_clamp_threshold"]
    rcst = ssm["restrict_clamp_scale_threshold"]
    if not (type(ssm["affine_rescaling"]) is Identity and type(rcs) is _RestrictClampValue
            and type(rct) is _RestrictClampValue and type(rcst) is _RestrictClampValue):
        return None
    if not (type(rct._modules["clamp_ste"]) is Identity and type(rcst._modules["clamp_ste"]) is Identity
            and type(rcst._modules["restrict_value_impl"]) is Identity):
        return None
    restricts = (rcs._modules["restrict_value_impl"], rct._modules["restrict_value_impl"])
    if all(type(r) is FloatRestrictValue and type(r._modules["apply_abs"]) is Abs for r in restricts):
        pot, pre = False, Abs
    elif all(type(r) is PowerOfTwoRestrictValue and type(r._modules["float_to_int_impl"]) is RoundSte
             and type(r._modules["power_of_two"]) is PowerOfTwo for r in restricts):
        pot, pre = True, LogTwo
    else:
        return None
    if type(ssm["restrict_scaling_pre"]) is not pre or type(ssm["restrict_threshold_pre"]) is not pre:
        return None
    clamp_scaling = ssm["clamp_scaling"]
    if type(clamp_scaling) is not _ClampValue:
        return None
    min_stat, min_scale = _min_val(clamp_scaling._modules["clamp_min_ste"]), _min_val(rcs._modules["clamp_ste"])
    if min_stat is None or min_scale is None:
        return None  # without a floor a zero tensor divides by zero: leave it to Brevitas
    return WeightSpec(kind, int(bits), pot, per_channel, tuple(stats.stats_output_shape), min_stat, min_scale,
                      impl)


_thresholds: dict[tuple[int, bool], np.ndarray] = {}


def _threshold(bits: int, pot: bool) -> np.ndarray:
    """Brevitas's restricted integer threshold as float32: T (float scale) or 2^round(log2 T) (power
    of two), shape () as IntScaling's; at 1 bit ClampedBinaryQuant's ``torch.ones(1)``, shape (1,).
    Computed once per (bits, restriction) with the torch ops Brevitas applies."""
    key = (bits, pot)
    if key not in _thresholds:
        t = torch.tensor(float(2 ** (bits - 1) - 1)) if bits > 1 else torch.ones(1)
        t = 2.0 ** torch.round(torch.log2(t)) if pot else torch.abs(torch.abs(t))
        _thresholds[key] = t.numpy()
    return _thresholds[key]


def _scale(stat: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """_StatsScaling.forward for a nonnegative float32 statistic of Brevitas's shape, op for op.

    Clamps (ScalarSignedClampMinSte on a value >= 0 is max(x, min)), round (half to even) and
    the division are exact IEEE operations and run in numpy; log2 and 2.0 ** x run in torch on a
    tensor of the statistic's shape, exactly as Brevitas calls them."""
    s = np.asarray(np.maximum(stat, np.float32(spec.min_stat)))
    if spec.pot:
        e = torch.log2(torch.from_numpy(s)).numpy()
        np.rint(e, out=e)
        s = torch.pow(2.0, torch.from_numpy(e)).numpy()  # what ``2.0 ** tensor`` calls
    s = np.asarray(np.maximum(s, np.float32(spec.min_scale)))
    return np.asarray(s / _threshold(spec.bits, spec.pot))


def weight_codes(layer: nn.Module, spec: WeightSpec | None = None) -> tuple[np.ndarray, int, np.ndarray] | None:
    """(int8 codes shaped like the weight, bits, float32 scale) as Brevitas computes them, or None.

    The scale has shape () per tensor and (C,) per channel. None: the quantizer
    is not one the fast path reproduces, or the weight is not CPU float32, or
    the result is a case Brevitas treats specially (see the module doc).
    Works on the detached weight: nothing here records autograd history.
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
    # a 2-d view: one row per output channel, or a single row (per tensor)
    rows = w.reshape(w.shape[0], -1) if spec.per_channel else w.reshape(1, -1)
    if spec.kind == "int":
        if spec.per_channel:
            top, bottom = rows.max(axis=1), rows.min(axis=1)
        else:
            top, bottom = rows.max(), rows.min()
        stat = np.maximum(top, -bottom)  # == max|w|, exactly; NaN propagates
    else:  # Brevitas's own statistic module (a mean depends on the summation order), on its view
        stat = spec.stats_impl(w_t.reshape(rows.shape) if spec.per_channel else w_t.reshape(-1)).numpy()
    scale = _scale(np.asarray(stat, dtype=np.float32).reshape(spec.stats_shape), spec)
    if scale.dtype != np.float32:
        return None
    lo, hi = float(scale.min()), float(scale.max())
    if not (_SCALE_MIN <= lo and hi <= _SCALE_MAX):  # also False for NaN
        return None
    if spec.kind == "int":
        top_code = 2 ** (spec.bits - 1) - 1
        y = np.divide(rows, scale.reshape(-1, 1))  # per tensor: (1, n) / (1, 1)
        np.rint(y, out=y)
        if not spec.pot:
            codes = y.astype(np.int8)  # |w / scale| <= T (1 + 2^-23): the clamp never acts (module doc)
        elif spec.bits <= 7:
            codes = y.astype(np.int8)  # |w / scale| <= 2^(b-1) sqrt(2) <= 91 fits int8: clamp after the cast
            np.clip(codes, np.int8(-top_code), np.int8(top_code), out=codes)
        else:
            np.clip(y, -top_code, top_code, out=y)
            codes = y.astype(np.int8)
    else:
        positive = np.greater_equal(rows, np.float32(0))
        n_pos = int(np.count_nonzero(positive))
        if n_pos == 0 or n_pos == positive.size:
            return None  # one code value only: Brevitas's int() refuses it
        codes = positive.view(np.int8)
        codes = codes + codes
        codes -= 1
    codes = codes.reshape(w.shape)
    flat_scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
    return codes, spec.bits, flat_scale
