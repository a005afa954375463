"""QONNX -> plain ONNX for onnxruntime: the fast (not bit-exact) emulation mode.

Host side only (imports onnx/qonnx lazily inside the functions). The round's
QONNX export (what ``export.to_qonnx`` / ``export_round`` writes) becomes a
graph onnxruntime runs on whole batches:

1. qonnx cleanup; every quantizer whose inputs are constant (the weights) is
   evaluated once and stored as a constant (qonnx's FoldConstants);
2. each remaining ``Quant`` (activations) becomes
   ``Mul(Sub(Round(Clip(Add(Div(x, s), z), lo, hi)), z), s)`` - qonnx's
   ``int_quant`` op for op (clip, then the rounding mode); a 1-bit signed
   ``Quant`` and ``BipolarQuant`` become ``Where(x >= 0, 1, -1) * s``;
3. the accelerator's input stage goes in front, as ``hw build``'s
   ``step_preprocess_io`` writes it: uint8 NHWC -> ``Transpose`` ->
   ``Mul(1/(255 std))`` -> ``Add(-mean/std)``;
4. the batch dimension becomes symbolic (constant ``Reshape`` targets copy it).

The output is the model's logits; the class is their argmax (lowest index on
ties). Float rounding at a quantizer's decision boundaries may differ from the
integer datapath of the accelerator, hence the label of this mode.
"""

from __future__ import annotations

import numpy as np

_ROUNDING = {"ROUND": "Round", "HALF_EVEN": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}


def _int_range(signed: bool, narrow: bool, bits: int) -> tuple[float, float]:
    if signed:
        lo = -(2 ** (bits - 1)) + (1 if narrow else 0)
        return float(lo), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - (2 if narrow else 1))


def qonnx_to_ort(model_bytes: bytes, mean, std, input_shape=(32, 32, 3)) -> bytes:
    """Serialized plain-ONNX model (input: uint8-valued float NHWC, batch symbolic; output: logits)."""
    import onnx
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.util.cleanup import cleanup_model

    m = ModelWrapper(onnx.load_from_string(model_bytes))
    m = cleanup_model(m)
    m = m.transform(FoldConstants(exclude_op_types=[]))
    g = m.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ValueError("expected a model with one input and one output")

    new_nodes = []
    counter = [0]

    def const(value, name_hint):
        counter[0] += 1
        name = f"ff_{name_hint}_{counter[0]}"
        arr = np.asarray(value, dtype=np.float32)
        g.initializer.append(onnx.numpy_helper.from_array(arr, name))
        return name

    def tmp(hint):
        counter[0] += 1
        return f"ff_{hint}_{counter[0]}"

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def sign_nodes(x, scale, out):
        ge = tmp("ge")
        pm = tmp("pm")
        return [
            helper.make_node("GreaterOrEqual", [x, const(0.0, "zero")], [ge]),
            helper.make_node("Where", [ge, const(1.0, "one"), const(-1.0, "minus_one")], [pm]),
            helper.make_node("Mul", [pm, scale], [out]),
        ]

    for node in list(g.node):
        if node.op_type == "Quant":
            x, s, z, b = node.input[:4]
            bits = m.get_initializer(b)
            if bits is None or m.get_initializer(s) is None or m.get_initializer(z) is None:
                raise ValueError(f"{node.name}: quantizer with non-constant scale/zero-point/bit width")
            bits = float(np.asarray(bits).reshape(-1)[0])
            signed, narrow = bool(attr(node, "signed", 1)), bool(attr(node, "narrow", 0))
            out = node.output[0]
            if bits == 1 and signed:  # qonnx: (sign(x/s + z) - z) * s, sign(0) = +1
                t = tmp("q")
                new_nodes += [
                    helper.make_node("Div", [x, s], [t + "_d"]),
                    helper.make_node("Add", [t + "_d", z], [t + "_a"]),
                    helper.make_node("GreaterOrEqual", [t + "_a", const(0.0, "zero")], [t + "_ge"]),
                    helper.make_node("Where", [t + "_ge", const(1.0, "one"), const(-1.0, "minus_one")], [t + "_pm"]),
                    helper.make_node("Sub", [t + "_pm", z], [t + "_y"]),
                    helper.make_node("Mul", [t + "_y", s], [out]),
                ]
                continue
            mode = str(attr(node, "rounding_mode", "ROUND")).upper()
            if mode not in _ROUNDING:
                raise ValueError(f"{node.name}: rounding mode {mode} not supported by the fast mode")
            lo, hi = _int_range(signed, narrow, int(bits))
            t = tmp("q")
            new_nodes += [
                helper.make_node("Div", [x, s], [t + "_d"]),
                helper.make_node("Add", [t + "_d", z], [t + "_a"]),
                helper.make_node("Clip", [t + "_a", const(lo, "lo"), const(hi, "hi")], [t + "_c"]),
                helper.make_node(_ROUNDING[mode], [t + "_c"], [t + "_r"]),
                helper.make_node("Sub", [t + "_r", z], [t + "_y"]),
                helper.make_node("Mul", [t + "_y", s], [node.output[0]]),
            ]
        elif node.op_type == "BipolarQuant":
            new_nodes += sign_nodes(node.input[0], node.input[1], node.output[0])
        elif node.domain and node.domain not in ("", "ai.onnx"):
            raise ValueError(f"{node.name}: op {node.op_type} ({node.domain}) not supported by the fast mode")
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)

    # input stage: uint8 NHWC (as float) -> normalized NCHW
    inp = g.input[0]
    h, w, c = input_shape
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    mul = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, c, 1, 1)
    add = (-mean / std).astype(np.float32).reshape(1, c, 1, 1)
    old = inp.name
    new_in = "image_uint8_nhwc"
    pre = [
        helper.make_node("Transpose", [new_in], ["ff_pre_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["ff_pre_nchw", const(mul, "pre_mul")], ["ff_pre_scaled"]),
        helper.make_node("Add", ["ff_pre_scaled", const(add, "pre_add")], [old]),
    ]
    for k, nd in enumerate(pre):
        g.node.insert(k, nd)
    g.input.remove(inp)
    g.input.insert(0, helper.make_tensor_value_info(new_in, TensorProto.FLOAT, ["N", h, w, c]))

    # symbolic batch
    out = g.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    g.output.remove(out)
    g.output.append(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["N"] + dims[1:]))
    del g.value_info[:]
    inits = {i.name: i for i in g.initializer}
    for nd in g.node:
        if nd.op_type == "Reshape" and nd.input[1] in inits:
            shp = onnx.numpy_helper.to_array(inits[nd.input[1]]).copy()
            if shp.size and shp[0] == 1:
                if -1 in shp.tolist():
                    shp[0] = 0  # copy the batch dimension of the input
                    for a in list(nd.attribute):
                        if a.name == "allowzero":
                            nd.attribute.remove(a)
                else:
                    shp[0] = -1
                new = onnx.numpy_helper.from_array(shp.astype(np.int64), nd.input[1] + "_ffbatch")
                g.initializer.append(new)
                nd.input[1] = new.name
    used = {t for nd in g.node for t in nd.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    # drop metadata of QONNX data types (not ONNX)
    del g.quantization_annotation[:]
    model = m.model
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model.SerializeToString()
