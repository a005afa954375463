"""The study model: the poster's ResNet-12 with GroupNorm.

Four residual blocks of widths 16/40/80/160. Each block: three 3x3 convs,
each followed by GroupNorm(2, c) and LeakyReLU(0.1) (the last activation comes
after the residual add), a 1x1 conv + GroupNorm shortcut, and a 2x2 max-pool.
Then global average pooling and a linear head. No conv biases (the norms
carry the affine terms): 780,266 parameters, 2.976 MiB in fp32.

Weights are quantized with Brevitas at 8/4/1 bits (``weight_bits``);
activations stay float, as in the poster. At 32 bits plain ``torch.nn``
layers are used, so the fp32 baseline pays nothing for Brevitas.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import weight_quant_kwargs

WIDTHS = (16, 40, 80, 160)
EXPECTED_PARAMETERS = 780_266


def conv(in_ch: int, out_ch: int, kernel: int, bits: int) -> nn.Module:
    padding = kernel // 2
    if bits == 32:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=False)
    from brevitas.nn import QuantConv2d

    return QuantConv2d(in_ch, out_ch, kernel, padding=padding, bias=False, **weight_quant_kwargs(bits))


def linear(in_features: int, out_features: int, bits: int) -> nn.Module:
    if bits == 32:
        return nn.Linear(in_features, out_features)
    from brevitas.nn import QuantLinear

    return QuantLinear(in_features, out_features, bias=True, **weight_quant_kwargs(bits))


class Block(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, bits: int):
        super().__init__()
        self.conv1, self.norm1 = conv(in_ch, out_ch, 3, bits), nn.GroupNorm(2, out_ch)
        self.conv2, self.norm2 = conv(out_ch, out_ch, 3, bits), nn.GroupNorm(2, out_ch)
        self.conv3, self.norm3 = conv(out_ch, out_ch, 3, bits), nn.GroupNorm(2, out_ch)
        self.shortcut = nn.Sequential(conv(in_ch, out_ch, 1, bits), nn.GroupNorm(2, out_ch))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    def __init__(self, num_classes: int = 10, weight_bits: int = 32, widths=WIDTHS):
        super().__init__()
        chans = (3, *widths)
        self.blocks = nn.Sequential(*[Block(chans[i], chans[i + 1], weight_bits) for i in range(len(widths))])
        self.head = linear(widths[-1], num_classes, weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
