"""The one training loop: local training on a client and evaluation.

Every way of running (in-process, Flower simulation, Flower deployment, the
benchmarks) calls ``train`` and ``evaluate`` here. Images arrive as uint8
NHWC arrays; they are normalised once per call (cheap next to training) and
augmented per batch (random crop with 4-pixel padding + horizontal flip).
"""

from __future__ import annotations

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


def train(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    mean=None,
    std=None,
) -> TrainResult:
    """Plain SGD over ``epochs`` passes of shuffled, augmented mini-batches."""
    if len(images) == 0:
        raise ValueError("a client with no training images cannot train")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    x_all = normalize(images, mean, std)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x, y = augment(x_all[idx], gen), y_all[idx]
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
    return TrainResult(total_loss / seen, correct / seen, len(x_all), time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 500, mean=None, std=None) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on the given images."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size], mean, std)
        y = torch.as_tensor(labels[i : i + batch_size], dtype=torch.long)
        out = model(x)
        total_loss += float(loss_fn(out, y))
        correct += int((out.argmax(1) == y).sum())
    n = max(1, len(images))
    return total_loss / n, correct / n
