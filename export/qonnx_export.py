"""PyTorch (Brevitas) model -> QONNX file.

``to_qonnx(model, path)`` runs Brevitas's ``export_qonnx`` on a batch-1
input, then qonnx's cleanup (shape inference, constant folding, unique and
readable names), then one repair of Brevitas's exporter (below), and saves
the graph. The model is exported in eval mode and put back in the mode it
was in.

Exporter: the TorchScript-based ``torch.onnx`` exporter (``dynamo=False``),
the path FINN's flow was built on; it is ~10x faster here than the dynamo
exporter (0.5 s vs 4-7 s for CNV) and gives Flatten/MatMul instead of
Reshape/Gemm. ``dynamo=True`` is available and converts as well.

Repair: Brevitas exports every 1-bit activation quantizer as
``BipolarQuant`` ({-s, +s}), also an unsigned 1-bit QuantReLU, which computes
{0, s}. ``_fix_unsigned_binary`` turns those nodes back into the equivalent
``Quant`` (bit width 1, unsigned), so the QONNX graph computes what the model
computes.

``finn_blockers(model)`` lists what in a QONNX graph FINN cannot compile
(GroupNorm, float activations, unquantized inputs of conv/matmul layers):
the study model ``resnet12`` hits all three.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from brevitas.export import export_qonnx
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)
QUANT_OPS = ("Quant", "BipolarQuant")
# ops that pass quantized values through unchanged (for "is this input quantized?")
_PASS_THROUGH = ("MaxPool", "Flatten", "Reshape", "Transpose", "GlobalAveragePool", "AveragePool", "ReduceMean",
                 "Pad", "Squeeze", "Unsqueeze")
_NORM_OPS = ("GroupNormalization", "InstanceNormalization", "LayerNormalization")
_FLOAT_ACTS = ("LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "Gelu", "HardSigmoid", "PRelu", "Relu", "Clip")


class NotDeployableError(ValueError):
    """A model or graph that FINN cannot compile."""


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines and warnings (torchvision missing, deprecations)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def to_qonnx(model: nn.Module, path: str | Path, input_shape=INPUT_SHAPE, dynamo: bool = False):
    """Export ``model`` as a cleaned-up QONNX graph at ``path``; returns the qonnx ModelWrapper."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="fedfinn-export-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            with _quiet(), torch.no_grad():
                export_qonnx(model, input_t=torch.zeros(input_shape), export_path=str(raw), dynamo=dynamo)
            wrapper = cleanup_model(ModelWrapper(str(raw)))
    finally:
        model.train(was_training)
    wrapper = _fix_unsigned_binary(wrapper)
    tmp_out = path.with_name(path.name + ".tmp")
    wrapper.save(str(tmp_out))
    os.replace(tmp_out, path)
    return wrapper


def _fix_unsigned_binary(wrapper):
    """BipolarQuant after a Relu (an unsigned 1-bit QuantReLU) -> Quant(bits 1, unsigned, zero point 0)."""
    graph = wrapper.graph
    for node in list(graph.node):
        if node.op_type != "BipolarQuant" or wrapper.get_initializer(node.input[0]) is not None:
            continue
        producer = wrapper.find_producer(node.input[0])
        if producer is None or producer.op_type != "Relu":
            continue
        zero, bits = node.name + "_zeropt", node.name + "_bitwidth"
        wrapper.set_initializer(zero, np.array(0.0, dtype=np.float32))
        wrapper.set_initializer(bits, np.array(1.0, dtype=np.float32))
        quant = helper.make_node(
            "Quant", [node.input[0], node.input[1], zero, bits], list(node.output), name=node.name,
            domain="qonnx.custom_op.general", signed=0, narrow=0, rounding_mode="ROUND",
        )
        index = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(index, quant)
    return wrapper


def _is_quantized(wrapper, tensor: str) -> bool:
    seen = 0
    while seen < 64:
        if wrapper.get_initializer(tensor) is not None:
            return True
        producer = wrapper.find_producer(tensor)
        if producer is None:
            return False  # a graph input that no Quant node covers
        if producer.op_type in QUANT_OPS:
            return True
        if producer.op_type not in _PASS_THROUGH:
            return False
        tensor, seen = producer.input[0], seen + 1
    return False


def finn_blockers(wrapper) -> list[str]:
    """Reasons FINN cannot compile this QONNX graph (empty when none is found)."""
    reasons = []
    ops = [n.op_type for n in wrapper.graph.node]
    norms = sorted({op for op in ops if op in _NORM_OPS})
    if norms:
        reasons.append(f"it uses GroupNorm (exported as {'/'.join(norms)}): FINN has no GroupNorm, "
                       "only BatchNorm, which folds into its thresholds")
    float_acts = sorted({
        n.op_type for n in wrapper.graph.node
        if n.op_type in _FLOAT_ACTS
        and not any(c.op_type in QUANT_OPS for c in (wrapper.find_consumers(n.output[0]) or []))
    })
    if float_acts:
        reasons.append(f"its activations are float ({', '.join(float_acts)} without a quantizer): "
                       "FINN compiles quantized activations only")
    unquant = [n.name for n in wrapper.graph.node
               if n.op_type in ("Conv", "MatMul", "Gemm") and not _is_quantized(wrapper, n.input[0])]
    if unquant:
        reasons.append(f"{len(unquant)} conv/matmul layer(s) take unquantized float inputs "
                       f"(first: {unquant[0]}): FINN needs integer streams")
    return reasons


def not_deployable_message(what: str, reasons: list[str]) -> str:
    return (
        f"{what} cannot be converted to FINN-ONNX: " + "; ".join(reasons) + ". "
        "Train a deployable model instead: model.name = \"resnet12-bn-wXaY\" (the same ResNet-12 "
        "with BatchNorm and quantized ReLUs) or \"cnv-wXaY\" (BNN-PYNQ's CNV), X, Y in 1, 2, 4, 8. "
        "The QONNX export of this model works (fedfinn export RUN --no-finn)."
    )
