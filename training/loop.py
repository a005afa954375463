"""The one training loop: local training on a client and evaluation.

Every way of running (in-process, Flower simulation, Flower deployment, the
benchmarks) calls ``train`` and ``evaluate`` here. Images arrive as uint8
NHWC arrays (numpy, or torch tensors already on the model's device); they are
moved to the model's device, normalised there once per call (cheap next to
training) and augmented there per batch (random crop with 4-pixel padding +
horizontal flip). The random stream (shuffling, crops, flips) comes from a
CPU generator seeded per client and round, so a run draws the same numbers on
every device.

Nothing here waits for the device inside the step loop: the loss and the
correct count are summed on the device (in float64 / int64, the same sums a
Python loop of ``float(loss)`` would make) and read once at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import augment, normalize


@dataclass
class TrainResult:
    loss: float
    accuracy: float
    examples: int  # images seen per epoch (the FedAvg weight)
    seconds: float


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A numpy array or tensor on ``device`` (no copy when it is already there)."""
    t = torch.as_tensor(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    return t.to(device, non_blocking=True)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked (it changes numerics: off by default); nothing on the CPU."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    mean=None,
    std=None,
    channels_last: bool = False,
    bf16: bool = False,
) -> TrainResult:
    """Plain SGD over ``epochs`` passes of shuffled, augmented mini-batches, on the model's device."""
    if len(images) == 0:
        raise ValueError("a client with no training images cannot train")
    start = time.perf_counter()
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    x_all = normalize(to_device(images, device), mean, std)
    y_all = to_device(labels, device).long()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen).to(device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x, y = _layout(augment(x_all[idx], gen), channels_last), y_all[idx]
            opt.zero_grad(set_to_none=True)
            with _autocast(device, bf16):
                out = model(x)
                loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            total_loss += loss.detach().double() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
    return TrainResult(float(total_loss) / seen, int(correct) / seen, len(x_all), time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model: nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, *,
             batch_size: int = 500, mean=None, std=None, channels_last: bool = False,
             bf16: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on the given images, on the model's device."""
    model.eval()
    device = model_device(model)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    images, labels = to_device(images, device), to_device(labels, device).long()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(images), batch_size):
        x = _layout(normalize(images[i : i + batch_size], mean, std), channels_last)
        y = labels[i : i + batch_size]
        with _autocast(device, bf16):
            out = model(x)
        total_loss += loss_fn(out.float(), y).double()
        correct += (out.argmax(1) == y).sum()
    n = max(1, len(images))
    return float(total_loss) / n, int(correct) / n
