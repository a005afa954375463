"""Software emulation of the accelerator: FINN's own execution of the folded model.

The model the build compiles (``NN_step_generate_estimate_reports.onnx``: folded,
bit widths minimized, every node an HLS/RTL-specialized HW layer) is executed
with finn-plus's ``execute_onnx``. Specialized nodes (``MVAU_hls``,
``Thresholding_rtl``, ...) only execute in cppsim/rtlsim (Vivado); each is mapped
back to its generic HW op (``MVAU``, ``Thresholding``, ...), whose Python
execution is the bit-exact reference FINN verifies cppsim/rtlsim against.
Folding, data types, thresholds and weights are those of the hardware.

Input: raw CIFAR images, uint8 NHWC (what the board receives). Output: the
class index (the accelerator ends in TopK/LabelSelect).

The reference is the QONNX model (the export, before any FINN step) executed
by qonnx on the normalized float images (``training.data.normalize``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np

from hw.finn_env import prepare as _prepare_env

_prepare_env()

from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402


def final_model_path(build_dir: str | Path, weights_dir: str | Path | None = None) -> Path:
    """The folded model of a build, or of a weight update (``hw weights`` output)."""
    if weights_dir is not None:
        p = Path(weights_dir) / "model.onnx"
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (run `fedfinn hw weights` first)")
        return p
    from hw.build import FINAL_STEP, find_intermediate

    return find_intermediate(build_dir, FINAL_STEP)


def to_python_exec(model: ModelWrapper) -> ModelWrapper:
    """Copy of ``model`` with specialized HW nodes mapped back to generic ones."""
    m = copy.deepcopy(model)
    for n in m.graph.node:
        if n.domain in ("finn.custom_op.fpgadataflow.hls", "finn.custom_op.fpgadataflow.rtl"):
            base = n.op_type.rsplit("_", 1)[0]
            n.op_type = base
            n.domain = "finn.custom_op.fpgadataflow"
    m.set_metadata_prop("exec_mode", "")
    return m


def _speed_up_xnor_matmul() -> None:
    """qonnx's xnorpopcountmatmul multiplies a (1, H, W, K) stack by (K, N), a
    batched numpy matmul that takes ~0.7 s per CNV layer; the same product as
    one (H*W, K) x (K, N) BLAS call takes ~4 ms. Same arithmetic, same result
    (integers in float32, |values| << 2^24)."""
    import qonnx.custom_op.general.xnorpopcount as xp

    if getattr(xp.xnorpopcountmatmul, "_fedfinn", False):
        return

    def xnorpopcountmatmul(inp0, inp1):
        k = inp0.shape[-1]
        assert k == inp1.shape[0], "Matrix shapes are not compatible with matmul."
        a = (2 * np.asarray(inp0, dtype=np.float32) - 1).reshape(-1, k)
        out = np.matmul(a, 2 * np.asarray(inp1, dtype=np.float32) - 1)
        return (out.reshape(*inp0.shape[:-1], inp1.shape[-1]) + k) * 0.5

    xnorpopcountmatmul._fedfinn = True
    xp.xnorpopcountmatmul = xnorpopcountmatmul


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


def _speed_up_mvau_matmul() -> None:
    import finn.custom_op.fpgadataflow.matrixvectoractivation as mvau

    if not isinstance(mvau.np, _NumpyWithFlatMatmul):
        mvau.np = _NumpyWithFlatMatmul()


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
        _speed_up_xnor_matmul()
        _speed_up_mvau_matmul()
        self.sanitize = sanitize
        self.model = to_python_exec(model)
        self.inp = self.model.graph.input[0].name
        self.out = self.model.graph.output[0].name
        self.in_shape = tuple(self.model.get_tensor_shape(self.inp))

    def predict(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        from finn.core.onnx_exec import execute_onnx

        x = np.asarray(images_uint8_nhwc)
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:]) != self.in_shape[1:]:
            raise ValueError(f"images of shape {x.shape[1:]} given, the accelerator takes {self.in_shape[1:]}")
        out = []
        old = os.environ.get("SANITIZE_QUANT_TENSORS")
        os.environ["SANITIZE_QUANT_TENSORS"] = "1" if self.sanitize else "0"
        try:
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
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    m = cleanup_model(ModelWrapper(str(qonnx_path)))
    inp, out = m.graph.input[0].name, m.graph.output[0].name
    res = [execute_onnx(m, {inp: x_norm_nchw[i : i + 1].astype(np.float32)})[out] for i in range(len(x_norm_nchw))]
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


def load_test_images(n: int, dataset: str = "cifar10", start: int = 0):
    """``n`` real test images (uint8 NHWC), labels, and the data set's mean/std."""
    from training.data import load_cifar

    d = load_cifar(dataset, download=False)
    return d.test_x[start : start + n], d.test_y[start : start + n], d.mean, d.std


def emulate(build_dir: str | Path, n: int = 100, qonnx: str | Path | None = None,
            weights_dir: str | Path | None = None, dataset: str | None = None, start: int = 0) -> dict:
    """Emulate ``n`` test images; compare top-1 with the QONNX model when given."""
    from training.data import normalize

    build_dir = Path(build_dir)
    rec = json.loads((build_dir / "build_config.json").read_text())
    dataset = dataset or rec.get("dataset", "cifar10")
    if qonnx is None:
        qonnx = rec["model_path"] if weights_dir is None else json.loads(
            (Path(weights_dir) / "weights.json").read_text())["model"]
    x, y, mean, std = load_test_images(n, dataset, start)
    emu = Emulator(final_model_path(build_dir, weights_dir))
    emu.predict(x[:1])  # warm-up: imports of the custom ops
    t0 = time.time()
    pred = emu.predict(x)
    dt = time.time() - t0
    res = {
        "build": str(build_dir),
        "weights": str(weights_dir) if weights_dir else None,
        "images": int(len(x)),
        "emulation_images_per_s": round(len(x) / dt, 2),
        "emulation_accuracy": float((pred == y).mean()),
    }
    if qonnx:
        xn = normalize(x, mean, std).numpy()
        t1 = time.time()
        logits = qonnx_logits(qonnx, xn)
        ref, tie = top1(logits)
        res.update({
            "qonnx_model": str(qonnx),
            "qonnx_images_per_s": round(len(x) / (time.time() - t1), 2),
            "qonnx_accuracy": float((ref == y).mean()),
            "top1_agree": int((ref == pred).sum()),
            "top1_identical": bool((ref == pred).all()),
            "images_with_tied_top_logits": int(tie.sum()),
            "top1_agree_plain_argmax": int((logits.argmax(1) == pred).sum()),
            "disagreeing_images": [int(i) + start for i in np.nonzero(ref != pred)[0]],
        })
    return res
