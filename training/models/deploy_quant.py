"""Brevitas quantizers of the deployable models (``cnv-wXaY``, ``resnet12-bn-wXaY``).

Every choice here is made for three consumers at once: QAT on the clients,
the federated loop (codec + FedAvg + server re-quantization), and FINN.

Weights (``weight_quant(bits, per_channel)``)
---------------------------------------------
* 2..8 bits: narrow-range signed integers, codes in [-(2^(b-1)-1), 2^(b-1)-1],
  scale = max|w| / (2^(b-1)-1) computed from the weight itself (Brevitas
  ``Int8WeightPerChannelFloat`` / ``Int8WeightPerTensorFloat`` with the bit
  width overridden). Per output channel for the layers followed by a
  BatchNorm (the scale folds into FINN's thresholds and 2-4 bit layers keep
  far more resolution than with one scale per tensor); per tensor for the
  classifier, whose scale must stay a scalar so that FINN can fold the tail
  of the network into a TopK.
* 1 bit: codes in {-1, +1}, scale = mean|w| per output channel (per tensor for
  the classifier), straight-through gradient, latent weights untouched
  (XNOR-Net's scale; the same construction as ``quant.BinaryWeightPerTensorMeanAbs``).

Why statistics and no learned or constant weight scale: only the quantized
weights travel (codes + scale). The server averages the decoded floats and
re-quantizes, and a client loads ``codes * scale`` into its float weights.
A scale that is a statistic of the weight tensor itself is a fixed point of
that round trip: quantizing w = codes * scale again gives the same codes
(max-abs: the largest code is always the top code, so the scale comes back;
mean-abs: sign(w) is the codes). A learned scale would be a separate float
that drifts from the codes; a constant scale (BNN-PYNQ binarizes with scale 1
and clips the latent weights to [-1, 1]) would reset the latent weights of
every client to exactly +-1 each round, after which the small SGD steps of
one round can hardly flip a sign. The mean-abs/max-abs scales keep the latent
weights at the magnitude of the distribution they were trained with.

Activations
-----------
* ``input_quant()``: the normalized image enters as signed 8 bits with a
  constant scale of 2^-6 (range [-2, 1.984]; CIFAR normalized pixels lie in
  [-1.99, 2.13], so only the brightest ~2% pixel values clip, and one code step
  (0.0156) is about one 8-bit pixel step (0.015-0.016)). A constant keeps the
  host-side preprocessing of the accelerator a fixed formula and leaves
  nothing to average.
* ``cnv_act(bits)``: BNN-PYNQ's CNV activation, a quantized hard-tanh with the
  constant range [-1, 1]: bipolar {-1, +1} at 1 bit (scale 1: FINN requires
  a unit scale for bipolar activations and then computes XNOR-popcount),
  narrow-range signed integers with scale 1/(2^(b-1)-1) above. The BatchNorm
  in front learns the range; nothing here is learned or averaged.
* ``relu_act(bits)``: unsigned ``bits``-bit QuantReLU with a learned per-tensor
  scale (a plain float parameter initialized to a clip value, PACT-style).
  No runtime-statistics initialization (Brevitas's default
  ``Uint8ActPerTensorFloat``) on purpose: that mode keeps a hidden step
  counter outside the state dict, and a client that rebuilds its model from a
  message each round would re-run the statistics phase and overwrite the
  averaged scale.
* ``residual_act(bits)``: signed QuantIdentity with a learned scale, used as ONE
  shared instance on both inputs of a residual add, so both branches are on
  the same integer grid and FINN can stream the add (AddStreams) after
  streamlining. A signed 1-bit integer cannot hold a residual, so at a1 this
  quantizer uses 2 bits (``residual_bits``).

Learned activation scales are ordinary float parameters: they travel in fp32
and FedAvg averages them like the weights.
"""

from __future__ import annotations

from brevitas.inject.enum import ScalingImplType, StatsOp
from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
from brevitas.quant.base import IntQuant, NarrowIntQuant, ParamMinMaxInitScaling, PerTensorFloatScaling8bit, UintQuant
from brevitas.quant.binary import SignedBinaryActPerTensorConst
from brevitas.quant.solver import ActQuantSolver

from .quant import BinaryWeightPerTensorMeanAbs

DEPLOY_BITS = (1, 2, 4, 8)
INPUT_BITS = 8
INPUT_MAX = 2.0  # signed 8 bit, non-narrow: scale = 2 / 128 = 2^-6


class BinaryWeightPerChannelMeanAbs(BinaryWeightPerTensorMeanAbs):
    """sign(w) times mean|w| of each output channel."""

    scaling_per_output_channel = True


class InputQuant(IntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
    """Signed 8-bit input with the constant scale INPUT_MAX / 128."""

    scaling_impl_type = ScalingImplType.CONST
    min_val = -INPUT_MAX
    max_val = INPUT_MAX


class ConstRangeSignedAct(NarrowIntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
    """Narrow signed integers on the constant range [-1, 1] (BNN-PYNQ's hard-tanh)."""

    scaling_impl_type = ScalingImplType.CONST
    min_val = -1.0
    max_val = 1.0


class LearnedReluAct(UintQuant, ParamMinMaxInitScaling, PerTensorFloatScaling8bit, ActQuantSolver):
    """Unsigned integers, learned per-tensor scale initialized from max_val."""

    max_val = 4.0


class LearnedSignedAct(IntQuant, ParamMinMaxInitScaling, PerTensorFloatScaling8bit, ActQuantSolver):
    """Signed integers, learned per-tensor scale initialized from max(|min_val|, max_val)."""

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
        return {"weight_quant": BinaryWeightPerChannelMeanAbs if per_channel else BinaryWeightPerTensorMeanAbs}
    quant = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    return {"weight_quant": quant, "weight_bit_width": bits}


def input_quant():
    from brevitas.nn import QuantIdentity

    return QuantIdentity(act_quant=InputQuant, bit_width=INPUT_BITS)


def cnv_act(bits: int):
    from brevitas.nn import QuantIdentity

    check_bits(bits, "activation")
    if bits == 1:
        return QuantIdentity(act_quant=SignedBinaryActPerTensorConst)  # {-1, +1}, scale 1
    return QuantIdentity(act_quant=ConstRangeSignedAct, bit_width=bits)


def relu_act(bits: int, max_val: float = 4.0):
    from brevitas.nn import QuantReLU

    check_bits(bits, "activation")
    return QuantReLU(act_quant=LearnedReluAct, bit_width=bits, max_val=max_val)


def residual_bits(bits: int) -> int:
    return max(2, check_bits(bits, "activation"))


def residual_act(bits: int, max_val: float = 4.0):
    from brevitas.nn import QuantIdentity

    return QuantIdentity(act_quant=LearnedSignedAct, bit_width=residual_bits(bits), min_val=-max_val, max_val=max_val)
