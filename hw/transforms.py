"""Graph rewrites the deployable models need and finn-plus does not have.

Used by ``step_streamline_residual`` (hw/build.py) between finn-plus's own
streamlining transformations.
"""

from __future__ import annotations

import numpy as np
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation


class MergeIdenticalTransposes(Transformation):
    """Several Transposes with the same perm reading one tensor -> one Transpose.

    Lowering a convolution whose input forks (residual shortcut + main branch)
    puts one NCHW->NHWC Transpose on each branch; FINN's MakeMaxPoolNHWC and
    AbsorbTransposeIntoMultiThreshold only handle a single consumer.
    """

    def apply(self, model: ModelWrapper):
        g = model.graph
        for tensor in {i for n in g.node for i in n.input}:
            cons = [c for c in model.find_consumers(tensor) or [] if c.op_type == "Transpose"]
            if len(cons) < 2:
                continue
            groups: dict[tuple, list] = {}
            for c in cons:
                perm = tuple(next(a.ints for a in c.attribute if a.name == "perm"))
                groups.setdefault(perm, []).append(c)
            for same in groups.values():
                if len(same) < 2:
                    continue
                keep, drop = same[0], same[1:]
                for d in drop:
                    for n in g.node:
                        for k, i in enumerate(n.input):
                            if i == d.output[0]:
                                n.input[k] = keep.output[0]
                    for k, o in enumerate(g.output):
                        if o.name == d.output[0]:
                            raise ValueError("graph output produced by a duplicate Transpose")
                    g.node.remove(d)
                return model, True
        return model, False


class ReduceMeanToGlobalAccPool(Transformation):
    """Global average pool (GlobalAveragePool, or ReduceMean over H, W of an
    integer NCHW tensor, as the dynamo exporter writes ``adaptive_avg_pool2d(x, 1)``)
    -> FINN's GlobalAccPool
    layer (an integer sum, NHWC) + Transpose + scalar Mul(scale / (H*W)).

    A scalar Mul in front (the last activation's scale) is folded into that
    Mul. Streamlining then moves the Mul past the flatten and the classifier's
    MatMul into the TopK, and FINN removes the Transpose+Reshape flatten:
    the accelerator computes the integer sum. (finn-plus's InferPoolFromReduce
    only handles Im2Col+Reshape+Reduce, and InferGlobalAccPoolLayer runs after
    streamlining, where its Mul can no longer move.)
    """

    def apply(self, model: ModelWrapper):
        g = model.graph
        for n in list(g.node):
            if n.op_type not in ("ReduceMean", "GlobalAveragePool"):
                continue
            shape = model.get_tensor_shape(n.input[0])
            if shape is None or len(shape) != 4:
                continue
            if n.op_type == "GlobalAveragePool":
                axes = [2, 3]
            elif len(n.input) > 1 and model.get_initializer(n.input[1]) is not None:
                axes = [int(a) % 4 for a in model.get_initializer(n.input[1]).flatten()]
            else:
                axes = [int(a) % 4 for a in next((a.ints for a in n.attribute if a.name == "axes"), [])]
            if sorted(axes) != [2, 3] or next((a.i for a in n.attribute if a.name == "keepdims"), 1) != 1:
                continue
            _, c, h, w = shape
            scale = 1.0 / (h * w)
            src = n.input[0]
            removed = []
            prod = model.find_producer(src)
            if (prod is not None and prod.op_type == "Mul" and model.get_initializer(prod.input[1]) is not None
                    and model.get_initializer(prod.input[1]).size == 1 and len(model.find_consumers(src)) == 1):
                scale *= float(model.get_initializer(prod.input[1]).flatten()[0])
                src = prod.input[0]
                removed.append(prod)
            idt = model.get_tensor_datatype(src)
            if not idt.is_integer():
                continue
            pos = list(g.node).index(n)
            new_nodes = []
            prod = model.find_producer(src)
            if (prod is not None and prod.op_type == "Transpose"
                    and list(next(a.ints for a in prod.attribute if a.name == "perm")) == [0, 3, 1, 2]
                    and len(model.find_consumers(src)) == 1):
                nhwc = prod.input[0]
                removed.append(prod)
            else:
                nhwc = model.make_new_valueinfo_name()
                new_nodes.append(helper.make_node("Transpose", [src], [nhwc], perm=[0, 2, 3, 1]))
            model.set_tensor_datatype(nhwc, idt)
            pooled = model.make_new_valueinfo_name()
            new_nodes.append(helper.make_node(
                "GlobalAccPool", [nhwc], [pooled], domain="finn.custom_op.fpgadataflow", backend="fpgadataflow",
                NumChannels=int(c), PE=1, inputDataType=idt.name, numInputVectors=[1, int(h), int(w)],
                name="GlobalAccPool_" + n.name))
            pooled_nchw = model.make_new_valueinfo_name()
            new_nodes.append(helper.make_node("Transpose", [pooled], [pooled_nchw], perm=[0, 3, 1, 2]))
            scale_name = model.make_new_valueinfo_name()
            model.set_initializer(scale_name, np.asarray(scale, dtype=np.float32))
            new_nodes.append(helper.make_node("Mul", [pooled_nchw, scale_name], [n.output[0]]))
            for k, nn in enumerate(new_nodes):
                g.node.insert(pos + k, nn)
            g.node.remove(n)
            for r in removed:
                g.node.remove(r)
            for vi in list(g.value_info):
                if vi.name == n.output[0]:
                    g.value_info.remove(vi)
            return model, True
        return model, False
