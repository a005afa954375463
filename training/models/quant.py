"""Brevitas weight quantizers used by the study model.

The poster quantizes weights only (activations stay float):

* 8 and 4 bits: Brevitas's default ``Int8WeightPerTensorFloat`` with the bit
  width overridden: narrow-range signed integers, one float scale per tensor,
  scale = max|w| / (2^(b-1) - 1), no learned parameters.
* 1 bit: a binary quantizer, w_q = mean|w| * sign(w) (XNOR-Net style scale).
  Brevitas's own ``SignedBinaryWeightPerTensorConst`` uses a constant scale
  and clamps the latent weights in place, which would shrink the weights
  every step once the scale is a statistic of them; we keep the scale a
  statistic and the latent weights untouched.
"""

from __future__ import annotations

from brevitas.core.function_wrapper import TensorClamp
from brevitas.inject.enum import ScalingImplType, StatsOp
from brevitas.quant import Int8WeightPerTensorFloat, SignedBinaryWeightPerTensorConst

SUPPORTED_WEIGHT_BITS = (32, 8, 4, 1)


class BinaryWeightPerTensorMeanAbs(SignedBinaryWeightPerTensorConst):
    """sign(w) times mean|w| of the tensor; straight-through gradient."""

    scaling_impl_type = ScalingImplType.STATS
    scaling_stats_op = StatsOp.AVE
    scaling_min_val = 1e-10
    tensor_clamp_impl = TensorClamp


def weight_quant_kwargs(bits: int) -> dict:
    """Keyword arguments for a Brevitas Quant layer at ``bits`` weight bits."""
    if bits == 1:
        return {"weight_quant": BinaryWeightPerTensorMeanAbs}
    if 2 <= bits <= 8:
        return {"weight_quant": Int8WeightPerTensorFloat, "weight_bit_width": bits}
    raise ValueError(f"weight bits must be one of 1..8 for a quantized layer, got {bits}")
