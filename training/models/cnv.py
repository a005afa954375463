"""CNV: the CIFAR-10 topology of BNN-PYNQ and FINN, for hardware.

Layout (32x32 input, unpadded 3x3 convolutions, as BNN-PYNQ's CNV):

    input quant (signed 8 bit)
    conv 3->64    BN  act    32 -> 30
    conv 64->64   BN  act    30 -> 28   max-pool 2 -> 14
    conv 64->128  BN  act    14 -> 12
    conv 128->128 BN  act    12 -> 10   max-pool 2 -> 5
    conv 128->256 BN  act     5 -> 3
    conv 256->256 BN  act     3 -> 1
    FC 256->512   BN  act
    FC 512->512   BN  act
    FC 512->classes          (logits)

Weights at X bits, activations at Y bits (``cnv-wXaY``), quantizers from
``deploy_layers`` (all scales powers of two): per-output-channel statistics
scales on the layers followed by BatchNorm, a per-tensor scale on the
classifier; BNN-PYNQ's constant-range quantized hard-tanh activations
(QuantIdentity on [-1, 1); bipolar at 1 bit, so W1A1 maps to FINN's
XNOR-popcount layers). 1,546,688 parameters. No conv/FC biases: each BatchNorm carries the affine
terms and folds into FINN's thresholds. The classifier has no bias and no
BatchNorm either, so the streamlined graph ends in one positive scalar Mul
that FINN can fold into a TopK (the label is the argmax of the integer
accumulators). Max-pooling acts on the quantized activations, as FINN
streams it.

BatchNorm statistics under FedAvg: running_mean and running_var are floating
state entries, so they travel and the server averages them weighted by
examples, exactly like the weights (num_batches_tracked is an integer buffer:
it does not travel and is not used, since momentum is fixed at 0.1). Why
averaging and not recomputation: the example-weighted mean of the clients'
running means is the mean over all their images; the mean of their running
variances is the within-client part of the pooled variance and misses only the
spread of the client means (small for the near-iid splits of the study, larger
for skewed alpha). The stats also describe the client networks rather than
the averaged one, which is the same approximation FedAvg makes for the
weights. Recomputing them on the server would need training images the
server does not have (the test set would leak). The BatchNorm momentum must
stay a number (not None, which would weight by num_batches_tracked).
"""

from __future__ import annotations

import torch
from torch import nn

from .deploy_layers import BatchNorm1d, BatchNorm2d, check_bits, cnv_act, input_quant, weight_quant

# (out_channels, max-pool after) per conv layer
CONV_LAYERS = ((64, False), (64, True), (128, False), (128, True), (256, False), (256, False))
FC_LAYERS = (512, 512)
KERNEL = 3
IN_SIZE = 32


class CNV(nn.Module):
    def __init__(self, num_classes: int = 10, weight_bits: int = 1, act_bits: int = 1, in_channels: int = 3):
        super().__init__()
        from brevitas.nn import QuantConv2d, QuantLinear

        self.weight_bits = check_bits(weight_bits, "weight")
        self.act_bits = check_bits(act_bits, "activation")
        self.input_quant = input_quant()
        layers: list[nn.Module] = []
        ch, size = in_channels, IN_SIZE
        for out_ch, pool in CONV_LAYERS:
            layers += [
                QuantConv2d(ch, out_ch, KERNEL, bias=False, **weight_quant(weight_bits)),
                BatchNorm2d(out_ch),
                cnv_act(act_bits),
            ]
            ch, size = out_ch, size - KERNEL + 1
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        if size != 1:
            raise AssertionError(f"CNV expects a {IN_SIZE}x{IN_SIZE} input (feature map ends at {size}x{size})")
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = []
        for width in FC_LAYERS:
            fc += [QuantLinear(ch, width, bias=False, **weight_quant(weight_bits)), BatchNorm1d(width), cnv_act(act_bits)]
            ch = width
        fc.append(QuantLinear(ch, num_classes, bias=False, **weight_quant(weight_bits, per_channel=False)))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.input_quant(x))
        return self.classifier(torch.flatten(x, 1))
