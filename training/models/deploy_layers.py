"""Quantizers and layers shared by the deployable models (``cnv``, ``resnet12_bn``).

Every choice here serves three consumers at once: QAT on the clients, the
federated loop (codec + FedAvg + server re-quantization), and FINN.

All scales are powers of two
----------------------------
Weights, activations and the input use power-of-two (fixed-point) scales.
With them every conv / matmul / add / pool of the network computes on exact
binary fractions: float32 sums of such products are exact whatever the
summation order, so PyTorch and ONNX Runtime (QONNX and FINN-ONNX execution)
agree bit for bit, and so does FINN's integer datapath up to the rounding of
its thresholds. The only float rounding left is the BatchNorm affine, which
the eval-mode ``BatchNorm2d`` / ``BatchNorm1d`` below compute exactly as ONNX
Runtime does. With float scales the exported graphs disagreed with PyTorch
on about one activation in 10^5-10^6 at 4-8 bits (a rounding decision that
flips), which moved the logits by ~1e-3 and changed top-1 on some images.
FINN prefers such scales anyway (BNN-PYNQ's CNV uses constant power-of-two
scales). Exact rounding ties (an activation exactly on a half step) are
rounded half to even by Brevitas and QONNX; ``export.finn_export`` makes the
FINN-ONNX thresholds do the same.

Weights (``weight_quant(bits, per_channel)``)
---------------------------------------------
* 2..8 bits: narrow-range signed codes in [-(2^(b-1)-1), 2^(b-1)-1] with a
  power-of-two scale from max|w|: scale = 2^round(log2 max|w|) / 2^(b-1)
  (2^round(log2 max|w|) at 2 bits, ternary codes {-1, 0, 1}). Brevitas's
  ``Int8WeightPerChannelFixedPoint`` / ``...PerTensorFixedPoint`` with the bit
  width overridden, the exponent rounded instead of ceiled and the narrow
  integer range (``IntScaling``). The few weights above (2^(b-1) - 1/2) *
  scale saturate at the top code. No gradient flows into the max|w|
  statistic (``AbsMaxDetached``): through it the largest weight of a channel
  collected the scale gradient of the whole channel, and 2-bit ResNets blew
  up under SGD with momentum 0.9. Per output channel for the layers followed
  by a BatchNorm (the scale folds into FINN's thresholds, and 2-4 bit layers
  keep much more resolution); per tensor for the classifier, whose scale
  must be a scalar so FINN can fold the network's tail into a TopK.
* 1 bit: codes in {-1, +1}, scale = mean|w| over the nonzero weights of each
  output channel (per tensor in the classifier), rounded to the nearest power
  of two in the log domain; straight-through gradient, latent weights
  untouched (XNOR-Net's scale; its gradient is kept: it is the only way a
  binary layer can change the magnitude of its output, e.g. the logits).
  Over the nonzero weights because pruned
  weights arrive as exact zeros: a plain mean would shrink the scale by the
  pruned fraction at every server round trip.

Why statistics, and not a learned or a constant weight scale: only quantized
weights travel (codes + scale). The server averages the decoded floats and
re-quantizes; a client loads ``codes * scale`` into its float weights. A scale
that is a statistic of the weight tensor is a fixed point of that round trip:
quantizing w = codes * scale again returns the same codes and the same scale
(max-abs: after one round trip the largest code c has log2(c) within
[b-1.49, b-1) (c = 1 at 2 bits), so the rounded exponent comes back, with a
margin that tolerates relative changes of 0.5% or more; with a ceiled
exponent a largest code of 2^(b-2) would halve the scale at every round trip;
mean-abs: sign(w) are the codes and the mean nonzero |w| is the scale), with or
without pruning. A learned scale would be a
separate float that drifts from the codes; a constant scale (BNN-PYNQ
binarizes with scale 1 and clips the latent weights to [-1, 1]) would reset
the latent weights of every client to exactly +-1 each round, after which the
small SGD steps of one local round can hardly flip a sign. The statistics keep
the latent weights at the magnitude they were trained at. (Brevitas's own
power-of-two int scaling divides by 2^(b-1); at 2 bits that clips the top
code and halves the scale at every round trip, hence ``IntScaling``.)

Activations
-----------
* ``input_quant()``: the normalized image enters as signed 8 bits with the
  constant scale 2^-6 (range [-2, 1.984]; normalized CIFAR pixels lie in
  [-1.99, 2.13], so only the brightest ~2% pixel values clip, and one code
  step, 0.0156, is about one 8-bit pixel step, 0.015-0.016). A constant keeps
  the accelerator's host-side preprocessing a fixed formula and leaves
  nothing to average.
* ``cnv_act(bits)``: BNN-PYNQ's CNV activation, a quantized hard-tanh on the
  constant range [-1, 1): bipolar {-1, +1} at 1 bit (scale 1: FINN requires a
  unit scale for bipolar activations and then computes XNOR-popcount),
  signed integers with scale 2^-(b-1) above. The BatchNorm in front learns
  the range; nothing here is learned or averaged.
* ``relu_act(bits)``: unsigned ``bits``-bit QuantReLU with a constant
  power-of-two scale (clip 2 at 1-2 bits, 4 at 4-8 bits; ``act_range``).
* ``residual_act(bits)``: signed QuantIdentity with a constant power-of-two
  scale, used as ONE shared instance on both inputs of a residual add, so
  both branches are on the same integer grid and FINN can stream the add
  (AddStreams) after streamlining. A signed 1-bit integer cannot hold a
  residual, so at a1 this quantizer uses 2 bits (``residual_bits``).

Every activation scale is a constant: the BatchNorm in front of each
quantizer learns the range (its affine terms are what moves). Learned
(PACT/LSQ-style) log2 scales were tried and dropped: under plain SGD with
momentum 0.9 the last block's scale fell to 2^-8 within 90 steps and the
network went dead, and Brevitas's statistics-initialized scales keep a step
counter outside the state dict, which a client that rebuilds its model from
every message would reset. Constant scales add nothing to the messages and
nothing for FedAvg to average.
"""

from __future__ import annotations

import torch
from brevitas.core.function_wrapper.ops_ste import RoundSte
from brevitas.core.scaling import IntScaling, PowerOfTwoIntScaling
from brevitas.inject.enum import RestrictValueType, ScalingImplType
from brevitas.quant.base import IntQuant, PerTensorFloatScaling8bit, UintQuant
from brevitas.quant.binary import SignedBinaryActPerTensorConst
from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint, Int8WeightPerTensorFixedPoint
from brevitas.quant.solver import ActQuantSolver
from torch import nn

from .quant import BinaryWeightPerTensorMeanAbs

DEPLOY_BITS = (1, 2, 4, 8)
INPUT_BITS = 8
INPUT_MAX = 2.0  # signed 8 bit, non-narrow: scale = 2 / 128 = 2^-6


# --- weight quantizers ----------------------------------------------------------

class AbsMaxDetached(nn.Module):
    """max|w| (per output channel when reduced), without a gradient into the statistic."""

    def __init__(self, stats_reduce_dim: int | None = None) -> None:
        super().__init__()
        self.stats_reduce_dim = stats_reduce_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.abs(x.detach())
        return a.max() if self.stats_reduce_dim is None else a.amax(dim=self.stats_reduce_dim)


class PoTWeightPerChannel(Int8WeightPerChannelFixedPoint):
    """Narrow signed codes, per-output-channel scale 2^round(log2 max|w|) / 2^(b-1)."""

    int_scaling_impl = IntScaling
    restrict_value_float_to_int_impl = RoundSte
    scaling_stats_impl = AbsMaxDetached


class PoTWeightPerTensor(Int8WeightPerTensorFixedPoint):
    """Narrow signed codes, per-tensor scale 2^round(log2 max|w|) / 2^(b-1)."""

    int_scaling_impl = IntScaling
    restrict_value_float_to_int_impl = RoundSte
    scaling_stats_impl = AbsMaxDetached


class AbsAveNonZero(nn.Module):
    """mean|w| over the nonzero entries (pruned weights do not shrink the scale)."""

    def __init__(self, stats_reduce_dim: int | None = None) -> None:
        super().__init__()
        self.stats_reduce_dim = stats_reduce_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.abs(x)
        if self.stats_reduce_dim is None:
            return a.sum() / torch.clamp((a != 0).sum(), min=1)
        dim = self.stats_reduce_dim
        return a.sum(dim=dim) / torch.clamp((a != 0).sum(dim=dim), min=1)


class BinaryWeightPerTensorPoT(BinaryWeightPerTensorMeanAbs):
    """sign(w) times mean|w| of the tensor's nonzero entries, rounded to a power of two."""

    scaling_stats_impl = AbsAveNonZero
    restrict_scaling_type = RestrictValueType.POWER_OF_TWO
    restrict_value_float_to_int_impl = RoundSte


class BinaryWeightPerChannelPoT(BinaryWeightPerTensorPoT):
    """sign(w) times mean nonzero |w| of each output channel, rounded to a power of two."""

    scaling_per_output_channel = True


# --- activation quantizers ------------------------------------------------------

class InputQuant(IntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
    """Signed 8-bit input with the constant scale INPUT_MAX / 128 = 2^-6."""

    scaling_impl_type = ScalingImplType.CONST
    min_val = -INPUT_MAX
    max_val = INPUT_MAX


class ConstRangeSignedAct(IntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
    """Signed integers on the constant range [-1, 1), scale 2^-(b-1) (BNN-PYNQ's hard-tanh)."""

    scaling_impl_type = ScalingImplType.CONST
    min_val = -1.0
    max_val = 1.0


class ConstReluAct(UintQuant, PerTensorFloatScaling8bit, ActQuantSolver):
    """Unsigned codes with the constant scale max_val / 2^b (a power of two for the max_val used here)."""

    scaling_impl_type = ScalingImplType.CONST
    int_scaling_impl = PowerOfTwoIntScaling  # 2^b, not 2^b - 1: keeps the scale a power of two
    max_val = 4.0


class ConstSignedAct(IntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
    """Signed codes with the constant scale max_val / 2^(b-1)."""

    scaling_impl_type = ScalingImplType.CONST
    min_val = -4.0
    max_val = 4.0


def check_bits(bits: int, what: str) -> int:
    if bits not in DEPLOY_BITS:
        raise ValueError(f"{what} bits must be one of {', '.join(map(str, DEPLOY_BITS))}, got {bits}")
    return bits


def weight_quant(bits: int, per_channel: bool = True) -> dict:
    """Keyword arguments of a QuantConv2d / QuantLinear at ``bits`` weight bits."""
    check_bits(bits, "weight")
    if bits == 1:
        return {"weight_quant": BinaryWeightPerChannelPoT if per_channel else BinaryWeightPerTensorPoT}
    return {"weight_quant": PoTWeightPerChannel if per_channel else PoTWeightPerTensor, "weight_bit_width": bits}


def input_quant() -> nn.Module:
    from brevitas.nn import QuantIdentity

    return QuantIdentity(act_quant=InputQuant, bit_width=INPUT_BITS)


def cnv_act(bits: int) -> nn.Module:
    from brevitas.nn import QuantIdentity

    check_bits(bits, "activation")
    if bits == 1:
        return QuantIdentity(act_quant=SignedBinaryActPerTensorConst)  # {-1, +1}, scale 1
    return QuantIdentity(act_quant=ConstRangeSignedAct, bit_width=bits)


def act_range(bits: int) -> float:
    """Clip value of the ResNet's ReLU and residual quantizers: tighter at low bit widths.

    ReLU: scale 1, 0.5, 0.25, 2^-6 at 1, 2, 4, 8 bits; residual (signed,
    max(b, 2) bits): scale 1 at 1-2 bits, 0.5 at 4, 2^-5 at 8.
    """
    return 2.0 if bits <= 2 else 4.0


def relu_act(bits: int) -> nn.Module:
    from brevitas.nn import QuantReLU

    check_bits(bits, "activation")
    return QuantReLU(act_quant=ConstReluAct, bit_width=bits, max_val=act_range(bits))


def residual_bits(bits: int) -> int:
    return max(2, check_bits(bits, "activation"))


def residual_act(bits: int) -> nn.Module:
    from brevitas.nn import QuantIdentity

    clip = act_range(bits)
    return QuantIdentity(act_quant=ConstSignedAct, bit_width=residual_bits(bits), min_val=-clip, max_val=clip)


# --- BatchNorm -------------------------------------------------------------------

def _onnx_bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, rounded exactly as ONNX Runtime rounds them.

    ONNX Runtime's BatchNormalization kernel computes inv_std = 1 / sqrt(var +
    eps), scale = inv_std * gamma, shift = beta - mean * scale, all in float32
    with IEEE rounding, then y = x * scale + shift. torch's float32 sqrt and
    division are not always correctly rounded, so those two steps go through
    float64 (correctly rounded to float32 afterwards).
    """
    var_eps = bn.running_var + bn.eps  # float32 add, as ORT
    std = torch.sqrt(var_eps.double()).float()  # correctly rounded float32 sqrt
    inv_std = (1.0 / std.double()).float()  # correctly rounded float32 reciprocal
    scale = inv_std * bn.weight
    shift = bn.bias - bn.running_mean * scale
    return scale, shift


class _ExactEvalBatchNorm:
    """Mixin: training mode is torch's BatchNorm; eval mode is ONNX Runtime's arithmetic.

    Exported graphs keep a standard BatchNormalization node (during export the
    torch op is traced). In eval mode the same affine is computed with the
    rounding of ONNX Runtime's kernel, so the PyTorch model and its QONNX /
    FINN-ONNX graphs see bit-identical BatchNorm outputs and therefore take the
    same quantization decisions. Mathematically this is BatchNorm's eval
    formula; only float32 rounding differs from torch's fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.track_running_stats or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        scale, shift = _onnx_bn_affine(self)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)


class BatchNorm2d(_ExactEvalBatchNorm, nn.BatchNorm2d):
    pass


class BatchNorm1d(_ExactEvalBatchNorm, nn.BatchNorm1d):
    pass
