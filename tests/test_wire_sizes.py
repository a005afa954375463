"""The poster's message sizes, as real bytes of the ResNet-12 on the wire.

Uplink: what a client sends (model_to_message after pruning, as in the
ClientApp). Downlink: what the server sends (CompressedFedAvg.downlink_message).
Both are len() of the exact bytes, in MiB = 2^20 bytes.
"""

import pytest
import torch

from training.codec import decode_values, mib
from training.compress import model_to_message
from training.config import load_config
from training.pruning import prune_
from training.strategy import CompressedFedAvg
from training.task import make_model

CASES = [  # (overrides, limit in MiB, the poster's figure)
    (["compression.entropy_coding=false"], None, 2.976),
    (["compression.weight_bits=8"], 0.76, 0.76),
    (["compression.weight_bits=4"], 0.39, 0.39),
    (["compression.weight_bits=1"], 0.11, 0.11),
    (["compression.prune_rate=0.9"], 0.37, 0.37),
    (["compression.prune_rate=0.99"], 0.05, 0.05),
]


def _sizes(overrides):
    cfg = load_config(None, overrides)
    torch.manual_seed(1)
    client = make_model(cfg)
    c = cfg.compression
    masks = prune_(client, c.prune_rate) if c.prune_rate else None
    up = model_to_message(client, masks, level=c.zstd_level, entropy=c.entropy_coding)
    down = CompressedFedAvg(cfg).downlink_message(make_model(cfg))
    return cfg, client, up, down


@pytest.mark.parametrize("overrides,limit,poster", CASES)
def test_message_sizes(overrides, limit, poster):
    cfg, client, up, down = _sizes(overrides)
    print(f"{overrides}: up {mib(len(up)):.4f} MiB, down {mib(len(down)):.4f} MiB (poster {poster})")
    for blob in (up, down):
        if limit is None:
            assert abs(mib(len(blob)) - poster) / poster < 0.01
        else:
            assert mib(len(blob)) <= limit
    # and the uplink decodes to exactly the weights the client's model computes with
    values = decode_values(up)
    for name, module in client.named_modules():
        if hasattr(module, "quant_weight"):
            assert torch.equal(torch.from_numpy(values[f"{name}.weight"]), module.quant_weight().value.detach())
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.equal(torch.from_numpy(values[f"{name}.weight"]), module.weight.detach())
