"""Do the exported graphs compute what the PyTorch model computes?

``parity(model, graph_path, x, kind)`` executes a QONNX graph
(``qonnx.core.onnx_exec``) or a FINN-ONNX graph (``finn.core.onnx_exec``)
on the normalized images ``x`` and compares the logits with the model's
(eval mode): max |difference|, top-1 agreement, and how many images have an
exact tie for the top logit in PyTorch (there top-1 is decided by index
order; with bit-identical logits it still agrees).

The exported file has batch size 1 (what FINN compiles); for speed the
graph is executed on a batch-N copy (qonnx ``ChangeBatchSize``), in chunks of
``batch`` images.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.change_batchsize import ChangeBatchSize
from qonnx.transformation.infer_shapes import InferShapes
from torch import nn

from .finn_env import finn_missing
from .finn_export import FinnUnavailableError

TOLERANCE = 1e-4  # max |logit difference| accepted by the checks


@dataclass
class Parity:
    kind: str  # qonnx | finn
    images: int
    max_abs_diff: float
    top1_agreement: float  # fraction of images with the same argmax
    top1_ties: int  # images whose top PyTorch logit is tied
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.top1_agreement == 1.0

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}

    def line(self) -> str:
        return (f"{self.kind:5s} parity on {self.images} images: max |logit diff| {self.max_abs_diff:.3g}, "
                f"top-1 agreement {self.top1_agreement:.2%} ({self.top1_ties} tied), {self.seconds:.1f} s"
                f" -> {'OK' if self.ok else 'MISMATCH'}")


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        return np.concatenate([model(x[i : i + batch]).numpy() for i in range(0, len(x), batch)])
    finally:
        model.train(was_training)


def execute(graph_path: str | Path, x: np.ndarray, kind: str = "qonnx", batch: int = 64) -> np.ndarray:
    """Logits of an ONNX graph on ``x`` (float32 NCHW), executed node by node."""
    if kind == "finn":
        why = finn_missing()
        if why is not None:
            raise FinnUnavailableError(why)
        from finn.core.onnx_exec import execute_onnx  # finn-plus is optional (make install-hw)
    elif kind == "qonnx":
        from qonnx.core.onnx_exec import execute_onnx
    else:
        raise ValueError(f"kind must be qonnx or finn, got {kind!r}")
    base = ModelWrapper(str(graph_path))
    copies: dict[int, object] = {}
    outs = []
    for i in range(0, len(x), batch):
        chunk = np.ascontiguousarray(x[i : i + batch], dtype=np.float32)
        n = len(chunk)
        if n not in copies:
            copies[n] = ModelWrapper(base.model.SerializeToString()).transform(ChangeBatchSize(n)).transform(InferShapes())
        g = copies[n]
        with warnings.catch_warnings():
            # Before streamlining, ConvertQONNXtoFINN annotates a MultiThreshold's output with
            # the final (signed) datatype while the node emits unsigned counts (the Add after it
            # applies the bias); qonnx warns on every execution. Values are not changed.
            warnings.filterwarnings("ignore", message=".*can't be represented with the set datatype annotation.*")
            result = execute_onnx(g, {g.graph.input[0].name: chunk})
        outs.append(np.asarray(result[g.graph.output[0].name]).reshape(n, -1))
    return np.concatenate(outs)


def parity(model: nn.Module, graph_path: str | Path, x: torch.Tensor, kind: str = "qonnx",
           reference: np.ndarray | None = None) -> Parity:
    ref = torch_logits(model, x) if reference is None else reference
    t0 = time.perf_counter()
    out = execute(graph_path, x.numpy(), kind)
    seconds = time.perf_counter() - t0
    top = np.sort(ref, axis=1)
    ties = int((top[:, -1] == top[:, -2]).sum()) if ref.shape[1] > 1 else 0
    return Parity(
        kind=kind,
        images=len(ref),
        max_abs_diff=float(np.abs(out - ref).max()),
        top1_agreement=float((out.argmax(1) == ref.argmax(1)).mean()),
        top1_ties=ties,
        seconds=seconds,
    )
