"""The fast (not bit-exact) emulation mode: the build's own graph in onnxruntime, new values per round.

Host side only (onnx/onnxruntime are imported by the functions that need
them). The graph comes from one place only: the build folder, the model
``hw build``'s first step ``step_preprocess_io`` left there (the accelerator's
input stage uint8 NHWC -> Transpose -> Mul(1/(255 std)) -> Add(-mean/std),
the network, TopK(1)). It is converted once, when the agent starts
(:func:`to_ort`): each ``Quant`` becomes ``Mul(Sub(Round(Clip(Add(Div(x, s),
z), lo, hi)), z), s)`` - qonnx's ``int_quant`` op for op (clip, then the
rounding mode), ``lo``/``hi`` from the build's bit width; a 1-bit signed
``Quant`` and ``BipolarQuant`` become ``Where(x >= 0, 1, -1) * s``; the batch
dimension becomes symbolic. Weight quantizers stay in the graph as operators
on their float weights (onnxruntime folds them when a session is made), so a
round changes values, never operators.

What a round may change (:func:`round_values`, the one rule the host and the
agent share): the value of every float32 initializer of that model except the
quantizers' bit widths - same names, same shapes. :func:`check_values` holds
an update against the build's before anything else happens (exact names,
float32, exact shapes, finite values; the total size is then the build's);
:func:`with_values` puts them into the converted graph. Nothing a peer sends
is parsed as ONNX, executed before this check, or can name a module to import.

The output is TopK's index (lowest index on ties, as the accelerator's
LabelSelect). Float rounding at a quantizer's decision boundaries may differ
from the integer datapath of the accelerator, hence the label of this mode.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .buildfiles import STEP_INPUT_STAGE, find_step_model

_ROUNDING = {"ROUND": "Round", "HALF_EVEN": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}
#: the domains qonnx writes its quantizers in (matched by name: nothing is imported)
QUANT_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")
STANDARD_DOMAINS = ("", "ai.onnx")
FLOAT = 1  # onnx.TensorProto.FLOAT


def _int_range(signed: bool, narrow: bool, bits: int) -> tuple[float, float]:
    if signed:
        lo = -(2 ** (bits - 1)) + (1 if narrow else 0)
        return float(lo), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - (2 if narrow else 1))


def build_model_path(build: str | os.PathLike) -> Path:
    """The build's input-stage model (``step_preprocess_io``): the only graph the fast mode runs."""
    return find_step_model(build, STEP_INPUT_STAGE)


def fixed_names(model) -> set[str]:
    """Initializers a round may not change: the quantizers' bit widths."""
    return {n.input[3] for n in model.graph.node if n.op_type == "Quant" and len(n.input) > 3}


def round_values(model) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` of what a round may change in ``model`` (an onnx ModelProto
    of the build's input-stage form): every float32 initializer except the bit widths."""
    from onnx import numpy_helper

    fixed = fixed_names(model)
    return {i.name: np.array(numpy_helper.to_array(i), dtype=np.float32)  # 0-d stays 0-d
            for i in model.graph.initializer if i.data_type == FLOAT and i.name not in fixed}


def value_specs(model) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of :func:`round_values`, without reading the values."""
    fixed = fixed_names(model)
    return {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer
            if i.data_type == FLOAT and i.name not in fixed}


def check_values(specs: dict[str, tuple[int, ...]], values: dict) -> dict[str, np.ndarray]:
    """``values`` as float32 arrays if they are exactly the build's (names, dtype, shapes, finite);
    ValueError naming the first problems otherwise. Nothing else is looked at."""
    want, got = set(specs), set(values)
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(f"the build takes exactly its {len(want)} values; missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unknown {[e[:60] for e in extra[:5]]}"
                         f"{'...' if len(extra) > 5 else ''}")
    out = {}
    for name in sorted(specs):
        a = values[name]
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            raise ValueError(f"{name}: float32 expected, got {getattr(a, 'dtype', type(a).__name__)}")
        if tuple(a.shape) != specs[name]:
            raise ValueError(f"{name}: shape {list(a.shape)}, the build has {list(specs[name])}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: values must be finite")
        out[name] = a
    return out


def to_ort(model):
    """The build's input-stage model (onnx ModelProto, trusted: read from the build folder) as a
    plain-ONNX graph onnxruntime runs on whole batches (input: uint8-valued float NHWC, batch
    symbolic; output: the class index). Keeps the names of :func:`round_values`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ValueError("expected a model with one input and one output")
    inits = {i.name: i for i in g.initializer}

    def value(name):
        if name not in inits:
            return None
        return numpy_helper.to_array(inits[name])

    counter = [0]

    def const(v, hint):
        counter[0] += 1
        name = f"ff_{hint}_{counter[0]}"
        g.initializer.append(numpy_helper.from_array(np.asarray(v, dtype=np.float32), name))
        return name

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def sign(x, s, z, out, t):
        nodes = []
        if z is not None:  # qonnx: (sign(x/s + z) - z) * s, sign(0) = +1
            nodes += [helper.make_node("Div", [x, s], [t + "_d"]), helper.make_node("Add", [t + "_d", z], [t + "_a"])]
            x = t + "_a"
        nodes += [helper.make_node("GreaterOrEqual", [x, const(0.0, "zero")], [t + "_ge"]),
                  helper.make_node("Where", [t + "_ge", const(1.0, "one"), const(-1.0, "minus_one")], [t + "_pm"])]
        if z is not None:
            nodes += [helper.make_node("Sub", [t + "_pm", z], [t + "_y"]), helper.make_node("Mul", [t + "_y", s], [out])]
        else:
            nodes += [helper.make_node("Mul", [t + "_pm", s], [out])]
        return nodes

    new_nodes = []
    for node in list(g.node):
        counter[0] += 1
        t = f"ff_q{counter[0]}"
        if node.op_type == "Quant" and node.domain in QUANT_DOMAINS:
            x, s, z, b = node.input[:4]
            bits = value(b)
            if bits is None or value(s) is None or value(z) is None:
                raise ValueError(f"{node.name}: quantizer with non-constant scale/zero-point/bit width")
            bits = float(np.asarray(bits).reshape(-1)[0])
            signed, narrow = bool(attr(node, "signed", 1)), bool(attr(node, "narrow", 0))
            if bits == 1 and signed:
                new_nodes += sign(x, s, z, node.output[0], t)
                continue
            mode = str(attr(node, "rounding_mode", "ROUND")).upper()
            if mode not in _ROUNDING:
                raise ValueError(f"{node.name}: rounding mode {mode} not supported by the fast mode")
            lo, hi = _int_range(signed, narrow, int(bits))
            new_nodes += [
                helper.make_node("Div", [x, s], [t + "_d"]),
                helper.make_node("Add", [t + "_d", z], [t + "_a"]),
                helper.make_node("Clip", [t + "_a", const(lo, "lo"), const(hi, "hi")], [t + "_c"]),
                helper.make_node(_ROUNDING[mode], [t + "_c"], [t + "_r"]),
                helper.make_node("Sub", [t + "_r", z], [t + "_y"]),
                helper.make_node("Mul", [t + "_y", s], [node.output[0]]),
            ]
        elif node.op_type == "BipolarQuant" and node.domain in QUANT_DOMAINS:
            new_nodes += sign(node.input[0], node.input[1], None, node.output[0], t)
        elif node.domain not in STANDARD_DOMAINS:
            raise ValueError(f"{node.name}: op {node.op_type} ({node.domain}) not supported by the fast mode")
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)

    # symbolic batch: input, output, constant Reshape targets
    for vi in (g.input[0], g.output[0]):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"
    if g.input[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError("the input stage's input must be a float tensor (uint8-valued)")
    for nd in g.node:
        if nd.op_type == "Reshape" and nd.input[1] in inits:
            shp = numpy_helper.to_array(inits[nd.input[1]]).copy()
            if shp.size and shp[0] == 1:
                if -1 in shp.tolist():
                    shp[0] = 0  # copy the batch dimension of the input
                    for a in list(nd.attribute):
                        if a.name == "allowzero":
                            nd.attribute.remove(a)
                else:
                    shp[0] = -1
                new = numpy_helper.from_array(shp.astype(np.int64), nd.input[1] + "_ffbatch")
                g.initializer.append(new)
                nd.input[1] = new.name
    del g.value_info[:]
    used = {t for nd in g.node for t in nd.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    del g.quantization_annotation[:]  # QONNX data types: not ONNX
    keep = [o for o in m.opset_import if o.domain in STANDARD_DOMAINS]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    m.ir_version = min(m.ir_version, 10)
    onnx.checker.check_model(m)
    return m


def with_values(ort_model, values: dict[str, np.ndarray]) -> bytes:
    """The converted graph with ``values`` (checked by :func:`check_values`) in place of the build's."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(ort_model)
    for init in m.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return m.SerializeToString()
