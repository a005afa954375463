"""Software emulation of the accelerator: FINN's own execution of the folded model.

The model the build compiles (``step_generate_estimate_reports``: folded, bit
widths minimized, every node an HLS/RTL-specialized HW layer) is executed with
finn-plus's ``execute_onnx``. Specialized nodes (``MVAU_hls``,
``Thresholding_rtl``, ...) only execute in cppsim/rtlsim (Vivado); finn-plus's
``despecialize_model`` maps each back to its generic HW op (``MVAU``,
``Thresholding``, ...), whose Python execution is the bit-exact reference FINN
verifies cppsim/rtlsim against. Folding, data types, thresholds and weights
are those of the hardware.

Input: raw images, uint8 NHWC (what the board receives). Output: the class
index (the accelerator ends in TopK/LabelSelect). The reference is the QONNX
model (the export, before any FINN step) executed by qonnx on normalized
float images, which the caller hands in (fedfinn.hw_commands).

:func:`finn_fallback` hands FINN's execution of single layers to the batched
numpy engine (client_pynq.dataflow), for layers it has no kernel for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from export.finn_env import prepare

prepare()

import finn.custom_op.fpgadataflow  # noqa: E402,F401  (registers FINN's custom ops)
import finn.custom_op.fpgadataflow.matrixvectoractivation as _mvau  # noqa: E402
import qonnx.custom_op.general.xnorpopcount as _xnorpopcount  # noqa: E402
from finn.core.onnx_exec import execute_onnx  # noqa: E402
from finn.util.verification import despecialize_model  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx as qonnx_execute_onnx  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402

#: The library functions the speed-ups below replace, with the versions and source fingerprints they
#: were written against, are listed in export.finn_env.LIBRARY_TARGETS (tests/test_hw.py checks them).
SPEEDUP_TARGETS = ("qonnx.custom_op.general.xnorpopcount.xnorpopcountmatmul",
                   "finn.custom_op.fpgadataflow.matrixvectoractivation.MVAU.execute_node")


def _xnorpopcountmatmul(inp0, inp1):
    """qonnx's xnorpopcountmatmul as one (H*W, K) x (K, N) BLAS call (same integers in float32)."""
    k = inp0.shape[-1]
    assert k == inp1.shape[0], "Matrix shapes are not compatible with matmul."
    a = (2 * np.asarray(inp0, dtype=np.float32) - 1).reshape(-1, k)
    out = np.matmul(a, 2 * np.asarray(inp1, dtype=np.float32) - 1)
    return (out.reshape(*inp0.shape[:-1], inp1.shape[-1]) + k) * 0.5


class _NumpyWithFlatMatmul:
    """numpy, except that ``matmul`` of an (..., K) stack by a (K, N) matrix runs as
    one 2-D BLAS product (numpy's batched loop is ~100x slower for these shapes).
    Installed as the ``np`` of finn's MVAU module only: FINN's own execute_node
    runs unchanged on top of it. Integer operands: identical results."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def matmul(a, b, *args, **kw):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim > 2 and b.ndim == 2 and not args and not kw:
            return np.matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
        return np.matmul(a, b, *args, **kw)


@contextlib.contextmanager
def faster_finn_python_execution():
    """Two drop-ins inside FINN's Python execution for the duration of a ``with`` block: same
    arithmetic, ~100x faster on CNV layers.

    * qonnx 1.0.0's ``xnorpopcountmatmul`` multiplies a (1, H, W, K) stack by (K, N) as a batched numpy
      matmul (~0.7 s per CNV layer); :func:`_xnorpopcountmatmul` does one 2-D BLAS call (~4 ms).
    * finn-plus 1.6.1's MVAU ``execute_node`` calls ``np.matmul`` on the same shapes: the module's ``np``
      becomes :class:`_NumpyWithFlatMatmul`.
    Integer operands far below 2^24: identical results. The originals are put back on exit.
    tests/test_hw.py compares both with the originals and fails when either library function
    changes (export.finn_env.LIBRARY_TARGETS)."""
    saved = (_xnorpopcount.xnorpopcountmatmul, _mvau.np)
    _xnorpopcount.xnorpopcountmatmul = _xnorpopcountmatmul
    _mvau.np = _NumpyWithFlatMatmul()
    try:
        yield
    finally:
        _xnorpopcount.xnorpopcountmatmul, _mvau.np = saved


class Emulator:
    """Run uint8 NHWC images through the folded dataflow model, one at a time.

    ``sanitize=False`` (default) skips qonnx's per-tensor re-rounding of
    integer tensors (a float-noise safety net that costs a third of the time);
    every HW layer here computes exact integers, and the tests compare the
    result with the QONNX model on real images.
    """

    def __init__(self, model: ModelWrapper | str | Path, sanitize: bool = False):
        if not isinstance(model, ModelWrapper):
            model = ModelWrapper(str(model))
        self.sanitize = sanitize
        self.model = despecialize_model(model)
        self.inp = self.model.graph.input[0].name
        self.out = self.model.graph.output[0].name
        self.in_shape = tuple(self.model.get_tensor_shape(self.inp))

    def predict(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        x = np.asarray(images_uint8_nhwc)
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:]) != self.in_shape[1:]:
            raise ValueError(f"images of shape {x.shape[1:]} given, the accelerator takes {self.in_shape[1:]}")
        out = []
        old = os.environ.get("SANITIZE_QUANT_TENSORS")
        os.environ["SANITIZE_QUANT_TENSORS"] = "1" if self.sanitize else "0"
        try:
            with faster_finn_python_execution():
                for i in range(x.shape[0]):
                    y = execute_onnx(self.model, {self.inp: x[i : i + 1].astype(np.float32)})[self.out]
                    out.append(int(np.asarray(y).reshape(-1)[0]))
        finally:
            if old is None:
                os.environ.pop("SANITIZE_QUANT_TENSORS", None)
            else:
                os.environ["SANITIZE_QUANT_TENSORS"] = old
        return np.asarray(out, dtype=np.int64)


def qonnx_logits(qonnx_path: str | Path, x_norm_nchw: np.ndarray) -> np.ndarray:
    """Logits of the exported QONNX model (qonnx execution), one image at a time."""
    m = cleanup_model(ModelWrapper(str(qonnx_path)))
    inp, out = m.graph.input[0].name, m.graph.output[0].name
    res = [qonnx_execute_onnx(m, {inp: x_norm_nchw[i : i + 1].astype(np.float32)})[out] for i in range(len(x_norm_nchw))]
    return np.concatenate(res, 0)


def top1(logits: np.ndarray, rtol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 with TopK's tie rule (lowest index among equal maxima) and a tie flag.

    The accelerator compares integer accumulators; the QONNX model scales them
    by a float, so equal integers can differ in the last float bit there.
    Logits within ``rtol`` of the row's largest magnitude count as equal.
    """
    logits = np.asarray(logits, dtype=np.float64)
    mx = logits.max(1, keepdims=True)
    tol = rtol * np.maximum(np.abs(logits).max(1, keepdims=True), 1e-12)
    near = logits >= mx - tol
    return near.argmax(1), near.sum(1) > 1


def finn_fallback(model: ModelWrapper, layer: str, inputs: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
    """FINN's Python execution of one layer of a folded model, image by image: the ``fallback`` of
    client_pynq.dataflow.DataflowModel for layers without a batched kernel there. ``inputs``: the
    layer's input tensors (batched activations, parameters as stored)."""
    generic = despecialize_model(model)
    node = generic.get_node_from_name(layer)
    inst = getCustomOp(node)
    params = {t for t in node.input if generic.get_initializer(t) is not None}
    with faster_finn_python_execution():
        return _finn_fallback(generic, node, inst, params, inputs, n)


def _finn_fallback(generic, node, inst, params, inputs, n):
    outs: list[list[np.ndarray]] = [[] for _ in node.output]
    for i in range(n):
        ctx = {t: (v if t in params else v[i : i + 1].reshape(generic.get_tensor_shape(t)))
               for t, v in inputs.items() if v is not None}
        for t in node.output:
            ctx[t] = np.zeros(generic.get_tensor_shape(t), dtype=np.float32)
        inst.execute_node(ctx, generic.graph)
        for j, t in enumerate(node.output):
            outs[j].append(ctx[t])
    return [np.concatenate(o, 0) for o in outs]
