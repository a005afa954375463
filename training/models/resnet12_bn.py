"""ResNet-12 with BatchNorm and quantized activations: the study model, made deployable.

Same skeleton as ``resnet12`` (widths 16/40/80/160, three 3x3 convs and a 1x1
conv shortcut per block, 2x2 max-pool after each block, global average pool,
linear head), changed where FINN needs it:

* BatchNorm instead of GroupNorm (FINN folds BatchNorm into thresholds; it
  has no GroupNorm);
* quantized activations: a signed 8-bit input quantizer, unsigned ``Y``-bit
  QuantReLUs instead of LeakyReLU(0.1) (a leaky ReLU would need signed codes
  and is not a standard FINN activation);
* a streamable residual: the main branch (conv3 + BN) and the shortcut
  (1x1 conv + BN) both end in ONE shared signed QuantIdentity instance, so
  the two inputs of every add are integers on the same scale and the add
  becomes an integer AddStreams after streamlining; the add is followed by
  the block's QuantReLU and the max-pool;
* no bias in the classifier, so the tail streamlines to a scalar Mul that
  FINN can fold into a TopK.

One block::

    x -> conv1 -> bn1 -> relu1 -> conv2 -> bn2 -> relu2 -> conv3 -> bn3 -> q_res --+
    x -> shortcut conv 1x1 -> bn_sc -----------------------------------------> q_res -> add -> relu -> max-pool

Weights at X bits (per-output-channel power-of-two statistics scales; per
tensor in the classifier), activations at Y bits with constant power-of-two
scales (the BatchNorms learn the ranges); the residual quantizer runs at
max(Y, 2) bits (see ``deploy_layers``). 780,256 parameters: the study
model's 780,266 less the classifier bias.

BatchNorm statistics are averaged by FedAvg like the weights (running_mean /
running_var travel as fp32; see ``cnv`` for why averaging rather than
recomputation).
"""

from __future__ import annotations

import torch
from torch import nn

from .deploy_layers import BatchNorm2d, check_bits, input_quant, relu_act, residual_act, weight_quant
from .resnet12 import WIDTHS


def qconv(in_ch: int, out_ch: int, kernel: int, bits: int) -> nn.Module:
    from brevitas.nn import QuantConv2d

    return QuantConv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False, **weight_quant(bits))


class Block(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, weight_bits: int, act_bits: int):
        super().__init__()
        self.conv1, self.bn1, self.act1 = qconv(in_ch, out_ch, 3, weight_bits), BatchNorm2d(out_ch), relu_act(act_bits)
        self.conv2, self.bn2, self.act2 = qconv(out_ch, out_ch, 3, weight_bits), BatchNorm2d(out_ch), relu_act(act_bits)
        self.conv3, self.bn3 = qconv(out_ch, out_ch, 3, weight_bits), BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential(qconv(in_ch, out_ch, 1, weight_bits), BatchNorm2d(out_ch))
        self.residual_quant = residual_act(act_bits)  # shared by both inputs of the add
        self.act_out = relu_act(act_bits)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.residual_quant(self.bn3(self.conv3(out)))
        short = self.residual_quant(self.shortcut(x))
        return self.pool(self.act_out(out + short))


class ResNet12BN(nn.Module):
    def __init__(self, num_classes: int = 10, weight_bits: int = 4, act_bits: int = 4, widths=WIDTHS):
        super().__init__()
        from brevitas.nn import QuantLinear

        self.weight_bits = check_bits(weight_bits, "weight")
        self.act_bits = check_bits(act_bits, "activation")
        self.input_quant = input_quant()
        chans = (3, *widths)
        self.blocks = nn.Sequential(*[Block(chans[i], chans[i + 1], weight_bits, act_bits) for i in range(len(widths))])
        self.head = QuantLinear(widths[-1], num_classes, bias=False, **weight_quant(weight_bits, per_channel=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.input_quant(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
