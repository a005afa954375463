"""Bit-exact, batched execution of a FINN dataflow model, and the runtime-weight file codec.

The emulation backend's engine: imports numpy, onnx and qonnx (never finn,
never the rest of the project). Nothing here is imported by the board agent
unless ``--emulate`` is given.

:class:`DataflowModel` runs the folded model of a FINN build (the
``intermediate_models/step_generate_estimate_reports.onnx`` of ``hw build``, or
the ``model.onnx`` of ``hw weights``) on a whole batch of images at once, with the arithmetic of
FINN's own Python execution of every HW layer (the reference FINN checks its
cppsim/rtlsim against):

* ``Thresholding``: ``count(x >= t) + ActVal`` per channel (BIPOLAR: ``2y-1``);
* ``MVAU``: integer matrix product (XNOR-popcount in binaryXnorMode), optional
  embedded thresholds;
* ``ConvolutionInputGenerator``: im2col, window order (kh, kw, channel);
* ``Pool`` (Max/Acc/Avg/QuantAvg), ``StreamingMaxPool``, ``FMPadding``,
  ``GlobalAccPool``, ``DuplicateStreams``, ``AddStreams``/``ElementwiseAdd``,
  ``LabelSelect`` (lowest index on ties, as ONNX TopK), data-width converters
  and FIFOs (identity).

Products run as one 2-D BLAS call per layer, in float32 when the layer's
worst-case accumulator (from its data types) stays below 2^24 (every integer
exact), else in float64. A layer without a batched kernel here needs an
execution handed in by the host side (``fallback``: hw.emulate.finn_fallback,
FINN's own ``execute_node`` image by image; listed in
``DataflowModel.fallback_nodes``); without one, the model is refused at load.
tests/test_client_pynq.py compares every intermediate tensor with FINN's
``execute_onnx``.

:class:`DatCodec` turns the runtime-weight files FINN's driver generator writes
(``runtime_weights/<partition>_<n>_<layer>.dat``: 32-bit hex words, what
``finn-plus-driver`` writes over AXI-lite) back into each layer's parameter
tensor, so the emulator consumes exactly the bytes a board would. The bit
layout is not re-implemented: the host measured it with FINN's own
``make_weight_file`` when it built the accelerator (hw/datfiles.py) and stored
it beside the files (``runtime_weights_layout.json`` / ``.npz``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import helper as _oh
from qonnx.core.modelwrapper import ModelWrapper

from .buildfiles import MAX_WORD, find_folded_model, parse_dat  # noqa: F401 (re-exported)

_EXACT_F32 = 2**24


# ----------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class DType:
    """The few facts about a FINN/QONNX DataType this module needs (parsed from its name)."""

    name: str
    bits: int
    signed: bool
    integer: bool

    @classmethod
    def parse(cls, name: str) -> "DType":
        name = str(name)
        if name.startswith("DataType["):
            name = name[len("DataType[") : -1].strip("'\"")
        if name == "BIPOLAR":
            return cls(name, 1, True, True)
        if name == "BINARY":
            return cls(name, 1, False, True)
        if name == "TERNARY":
            return cls(name, 2, True, True)
        for prefix, signed in (("UINT", False), ("INT", True)):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                return cls(name, int(name[len(prefix):]), signed, True)
        return cls(name, 32, True, False)  # FLOAT32, FIXED<...>, ...

    @property
    def min(self) -> float:
        if self.name == "BIPOLAR":
            return -1
        if self.name == "TERNARY":
            return -1
        if not self.integer:
            return -np.inf
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> float:
        if self.name in ("BIPOLAR", "BINARY", "TERNARY"):
            return 1
        if not self.integer:
            return np.inf
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))


def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = _oh.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def generic_op(node) -> str:
    """``MVAU_hls`` -> ``MVAU``: the op type without the HLS/RTL specialization suffix."""
    if node.domain.endswith(".hls") or node.domain.endswith(".rtl"):
        return node.op_type.rsplit("_", 1)[0]
    return node.op_type


# ----------------------------------------------------------------------------- kernels


def _acc_dtype(k: int, a: DType, w: DType):
    bound = k * a.absmax * w.absmax
    return np.float32 if bound < _EXACT_F32 else np.float64


def _multithreshold(x: np.ndarray, thr: np.ndarray, in_dt: DType) -> np.ndarray:
    """``count(x >= t)`` per channel (last axis); thresholds (C, T) or (1, T)."""
    c = x.shape[-1]
    thr = np.asarray(thr, dtype=np.float64)
    if thr.shape[0] == 1 and c != 1:
        thr = np.broadcast_to(thr, (c, thr.shape[1]))
    t = thr.shape[1]
    lo, hi = in_dt.min, in_dt.max
    if in_dt.integer and hi - lo < 2**16 and c * (hi - lo + 1) <= 2**23 and t > 4:
        # look-up table over every input value the data type allows
        vals = np.arange(lo, hi + 1, dtype=np.float64)
        lut = (vals[None, :, None] >= thr[:, None, :]).sum(-1).astype(np.float32)  # (C, V)
        idx = (x - lo).astype(np.int64)
        if idx.min(initial=0) < 0 or idx.max(initial=0) > hi - lo:
            raise ValueError(f"input values outside the data type {in_dt.name}")
        flat = lut[np.arange(c)[None, :], idx.reshape(-1, c)]
        return flat.reshape(x.shape)
    if t <= 16:
        th = thr
        if x.dtype == np.float32 and np.array_equal(thr.astype(np.float32).astype(np.float64), thr):
            th = thr.astype(np.float32)  # exact in float32: compare without widening x
        out = np.zeros(x.shape, dtype=np.float32)
        for j in range(t):
            out += x >= th[:, j]
        return out
    srt = np.sort(thr, axis=1)
    xr = x.reshape(-1, c)
    out = np.empty(xr.shape, dtype=np.float32)
    for ch in range(c):
        out[:, ch] = np.searchsorted(srt[ch], xr[:, ch], side="right")
    return out.reshape(x.shape)


def _im2col(x: np.ndarray, k, s, d, pad=(0, 0, 0, 0), pad_val=0.0) -> np.ndarray:
    """(N, H, W, C) -> (N, OH, OW, kh*kw*C), window order (kh, kw, C) as qonnx's Im2Col."""
    if any(pad):
        x = np.pad(x, ((0, 0), (pad[0], pad[2]), (pad[1], pad[3]), (0, 0)), constant_values=pad_val)
    n, h, w, c = x.shape
    kh, kw = k
    sh, sw = s
    dh, dw = d
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    sn, shs, sws, sc = x.strides
    v = np.lib.stride_tricks.as_strided(
        x, shape=(n, oh, ow, kh, kw, c), strides=(sn, shs * sh, sws * sw, shs * dh, sws * dw, sc), writeable=False
    )
    return v.reshape(n, oh, ow, kh * kw * c)


class _Node:
    def __init__(self, node, model):
        self.proto = node
        self.name = node.name
        self.op = generic_op(node)
        self.attrs = _attrs(node)
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.in_dt = [DType.parse(model.get_tensor_datatype(t)) if t else None for t in node.input]
        self.out_dt = [DType.parse(model.get_tensor_datatype(t)) for t in node.output]
        self.out_shapes = [list(model.get_tensor_shape(t)) for t in node.output]


class DataflowModel:
    """A folded FINN dataflow model, executable on batches (see module docstring)."""

    BATCHED = {
        "Thresholding", "MVAU", "ConvolutionInputGenerator", "Pool", "StreamingMaxPool", "FMPadding",
        "GlobalAccPool", "DuplicateStreams", "AddStreams", "ElementwiseAdd", "LabelSelect",
        "StreamingDataWidthConverter", "StreamingFIFO",
    }

    def __init__(self, model, fallback: Callable | None = None):
        if not isinstance(model, ModelWrapper):
            model = ModelWrapper(str(model))
        self.model = model
        g = model.graph
        self.input = g.input[0].name
        self.output = g.output[0].name
        self.in_shape = tuple(model.get_tensor_shape(self.input))
        self.in_dt = DType.parse(model.get_tensor_datatype(self.input))
        self.params: dict[str, np.ndarray] = {i.name: model.get_initializer(i.name) for i in g.initializer}
        self.nodes = [_Node(n, model) for n in g.node]
        self.fallback_nodes = [n.name for n in self.nodes if n.op not in self.BATCHED]
        if self.fallback_nodes and fallback is None:
            raise ValueError(f"no batched kernel here for {', '.join(self.fallback_nodes)}; the host side can "
                             "hand in FINN's own execution for them (hw.emulate.finn_fallback)")
        self.fallback = fallback  # fallback(model, node name, {input name: batch}, n) -> list of outputs

    # -- parameters
    def param_name(self, layer: str, index: int = 1) -> str:
        for n in self.nodes:
            if n.name == layer:
                return n.inputs[index]
        raise KeyError(f"no layer named {layer!r} in the dataflow model")

    def set_param(self, layer: str, value: np.ndarray, index: int = 1) -> None:
        name = self.param_name(layer, index)
        old = self.params[name]
        value = np.asarray(value, dtype=np.float32)
        if value.shape != old.shape:
            raise ValueError(f"{layer}: parameter shape {value.shape} != {old.shape}")
        self.params[name] = value

    def get_param(self, layer: str, index: int = 1) -> np.ndarray:
        return self.params[self.param_name(layer, index)]

    # -- execution
    def predict(self, images: np.ndarray, chunk: int = 50) -> np.ndarray:
        """Outputs of the accelerator (class indices for a LabelSelect/TopK end) for a batch."""
        x = np.asarray(images)
        if x.ndim == len(self.in_shape) - 1:
            x = x[None]
        if tuple(x.shape[1:]) != tuple(self.in_shape[1:]):
            raise ValueError(f"inputs of shape {tuple(x.shape[1:])}, the accelerator takes {tuple(self.in_shape[1:])}")
        outs = [self.run(x[i : i + chunk])[self.output] for i in range(0, len(x), chunk)]
        y = np.concatenate(outs, 0)
        return y.reshape(len(x), -1)

    def run(self, x: np.ndarray, keep_all: bool = False) -> dict[str, np.ndarray]:
        """Execute on a batch; returns the graph output (and every tensor if ``keep_all``)."""
        x = np.asarray(x)
        if self.in_dt.integer and (x.min(initial=0) < self.in_dt.min or x.max(initial=0) > self.in_dt.max):
            raise ValueError(f"input values outside {self.in_dt.name}")
        n = x.shape[0]
        ctx: dict[str, np.ndarray] = {self.input: x.astype(np.float32)}
        consumers: dict[str, int] = {}
        for nd in self.nodes:
            for t in nd.inputs:
                consumers[t] = consumers.get(t, 0) + 1
        for nd in self.nodes:
            args = [ctx[t] if t in ctx else self.params.get(t) for t in nd.inputs]
            if nd.op in self.BATCHED:
                outs = getattr(self, "_op_" + nd.op)(nd, args)
            else:
                outs = self._fallback(nd, args, n)
            for name, shape, val in zip(nd.outputs, nd.out_shapes, outs):
                ctx[name] = np.asarray(val).reshape([n] + list(shape[1:]))
            if not keep_all:
                for t in nd.inputs:
                    if t in consumers:
                        consumers[t] -= 1
                        if consumers[t] == 0 and t != self.output and t in ctx:
                            del ctx[t]
        return ctx

    # -- kernels (args: batched activations, parameters as stored)
    def _op_Thresholding(self, nd, args):
        x, thr = args[0], args[1]
        y = _multithreshold(x, thr, nd.in_dt[0]) + float(nd.attrs.get("ActVal", 0))
        if nd.out_dt[0].name == "BIPOLAR":
            y = 2 * y - 1
        return [y.astype(np.float32)]

    def _op_MVAU(self, nd, args):
        x, w = args[0], args[1]
        mw = int(nd.attrs["MW"])
        a = x.reshape(-1, mw)
        wdt, adt = nd.in_dt[1], nd.in_dt[0]
        dt = _acc_dtype(mw, adt, wdt)
        a = a.astype(dt, copy=False)
        wm = np.asarray(w).astype(dt, copy=False)
        if int(nd.attrs.get("binaryXnorMode", 0)):
            # popcount(xnor(a, w)) for a, w in {0, 1} = a.w + (1-a).(1-w) = 2 a.w - sum(a) - sum(w) + K
            acc = 2 * np.matmul(a, wm)
            acc -= a.sum(axis=1, dtype=dt)[:, None]
            acc -= wm.sum(axis=0, dtype=dt)[None, :]
            acc += mw
        elif adt.name == "BIPOLAR" and wdt.name == "BIPOLAR":
            # FINN: xnorpopcount((a+1)/2, (w+1)/2) = (a.w + K) / 2
            acc = (np.matmul(a, wm) + mw) * 0.5
        else:
            acc = np.matmul(a, wm)
        if int(nd.attrs.get("noActivation", 1)) == 0:
            thr = args[2]
            bip = nd.out_dt[0].name == "BIPOLAR"
            y = _multithreshold(acc, thr, DType("FLOAT32", 32, True, False))
            acc = 2 * y - 1 if bip else y + float(nd.attrs.get("ActVal", 0))
        return [acc.astype(np.float32) if dt == np.float32 or np.abs(acc).max(initial=0) < _EXACT_F32 else acc]

    def _op_ConvolutionInputGenerator(self, nd, args):
        k = nd.attrs["ConvKernelDim"]
        s = nd.attrs["Stride"]
        d = nd.attrs.get("Dilation", [1, 1])
        ifm = nd.attrs["IFMDim"]
        c = nd.attrs["IFMChannels"]
        x = args[0].reshape(-1, ifm[0], ifm[1], c)
        return [_im2col(np.ascontiguousarray(x), k, s, d)]

    def _op_Pool(self, nd, args):
        x = args[0]
        k = nd.attrs["KernelSize"]
        ch = nd.attrs["Channels"]
        k2 = k[0] * k[1]
        t = x.reshape(list(x.shape[:-1]) + [k2, ch])
        fn = nd.attrs["Function"]
        if fn == "MaxPool":
            return [t.max(axis=-2)]
        if fn == "AccPool":
            return [t.sum(axis=-2)]
        if fn == "AvgPool":
            return [t.mean(axis=-2)]
        if fn == "QuantAvgPool":
            ibits = nd.in_dt[0].bits
            obits = nd.out_dt[0].bits
            shift = max(int((2**ibits - 1) * k2).bit_length() - obits, 0)
            return [np.right_shift(t.sum(axis=-2).astype(np.int64), shift).astype(np.float32)]
        raise NotImplementedError(f"Pool function {fn}")

    def _op_StreamingMaxPool(self, nd, args):
        x = args[0]
        k = nd.attrs["PoolDim"]
        ifm = nd.attrs["ImgDim"]
        c = nd.attrs["NumChannels"]
        ceil = int(nd.attrs.get("CeilMode", 0))
        n = x.shape[0]
        x = x.reshape(n, ifm[0], ifm[1], c)
        oh = nd.out_shapes[0][1]
        ow = nd.out_shapes[0][2]
        if ceil:
            ph, pw = oh * k[0] - ifm[0], ow * k[1] - ifm[1]
            x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-np.inf)
        x = x[:, : oh * k[0], : ow * k[1], :]
        return [x.reshape(n, oh, k[0], ow, k[1], c).max(axis=(2, 4))]

    def _op_FMPadding(self, nd, args):
        p = nd.attrs["Padding"]
        x = args[0]
        return [np.pad(x, ((0, 0), (p[0], p[2]), (p[1], p[3]), (0, 0)), "constant")]

    def _op_GlobalAccPool(self, nd, args):
        x = args[0]
        return [x.reshape(x.shape[0], -1, x.shape[-1]).sum(axis=1, dtype=np.float64)]

    def _op_DuplicateStreams(self, nd, args):
        return [args[0]] * len(nd.outputs)

    def _op_AddStreams(self, nd, args):
        return [args[0].astype(np.float64) + args[1]]

    def _op_ElementwiseAdd(self, nd, args):
        a, b = args[0], args[1]
        if a.shape[0] != b.shape[0] and b.shape[0] == 1:  # a broadcast parameter
            pass
        return [np.asarray(a, dtype=np.float64) + np.asarray(b, dtype=np.float64)]

    def _op_LabelSelect(self, nd, args):
        x = args[0]
        k = int(nd.attrs.get("K", 1))
        x2 = x.reshape(x.shape[0], -1)
        # ONNX TopK (what FINN's LabelSelect execution uses): largest first, lower index on ties
        order = np.argsort(-x2, axis=1, kind="stable")[:, :k]
        return [order.astype(np.float32)]

    def _op_StreamingDataWidthConverter(self, nd, args):
        return [args[0]]

    def _op_StreamingFIFO(self, nd, args):
        return [args[0]]

    # -- layers without a batched kernel: the execution handed in by the host side
    def _fallback(self, nd, args, n):
        inputs = {t: (self.params[t] if t in self.params else a) for t, a in zip(nd.inputs, args)}
        return self.fallback(self.model, nd.name, inputs, n)


# ----------------------------------------------------------------------------- .dat codec


LAYOUT_JSON = "runtime_weights_layout.json"  # written by the host's hw build (hw/datfiles.py)
LAYOUT_NPZ = "runtime_weights_layout.npz"

@dataclass
class _LayerCodec:
    layer: str
    shape: tuple
    bipolar: bool
    signed: bool
    words: int  # words in the file
    lsb: np.ndarray  # bit position of each field's least significant bit
    index: np.ndarray  # flat element index of each field
    width: int

    def decode(self, words: np.ndarray) -> np.ndarray:
        if len(words) != self.words:
            raise ValueError(f"{self.layer}: {len(words)} words, the layer takes {self.words}")
        bits = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")
        codes = np.zeros(len(self.lsb), dtype=np.int64)
        for j in range(self.width):
            codes |= bits[self.lsb + j].astype(np.int64) << j
        if self.bipolar:
            vals = 2 * codes - 1
        elif self.signed:
            vals = np.where(codes >= 2 ** (self.width - 1), codes - 2**self.width, codes)
        else:
            vals = codes
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float64)
        out[self.index] = vals
        return out.reshape(self.shape).astype(np.float32)


class DatCodec:
    """Maps a build's runtime-weight files to the layers' parameter tensors (module docstring).

    The layout of every file was measured by the host when it built the accelerator
    (``runtime_weights_layout.json`` / ``.npz`` beside the ``.dat`` files); nothing
    here needs FINN.
    """

    def __init__(self, layout_dir: str | os.PathLike):
        layout_dir = Path(layout_dir)
        meta = json.loads((layout_dir / LAYOUT_JSON).read_text())
        with np.load(layout_dir / LAYOUT_NPZ, allow_pickle=False) as arrays:
            self.layers = {
                fname: _LayerCodec(m["layer"], tuple(m["shape"]), bool(m["bipolar"]), bool(m["signed"]),
                                   int(m["words"]), arrays[f"lsb_{m['arrays']}"], arrays[f"index_{m['arrays']}"],
                                   int(m["width"]))
                for fname, m in meta["files"].items()
            }
        self.files = sorted(self.layers)

    def check(self, df: "DataflowModel") -> None:
        """Every file's layer exists in ``df`` with the parameter shape the layout was measured for."""
        for fname, c in self.layers.items():
            shape = tuple(df.get_param(c.layer).shape)
            if shape != c.shape:
                raise ValueError(f"{fname}: layout for shape {c.shape}, the model's {c.layer} has {shape}")

    def decode(self, fname: str, data: bytes) -> tuple[str, np.ndarray]:
        """(layer name, parameter tensor) of one runtime-weight file."""
        if fname not in self.layers:
            raise KeyError(f"{fname}: not a runtime-weight file of this build (known: {len(self.layers)} files)")
        c = self.layers[fname]
        return c.layer, c.decode(parse_dat(data))
