"""A build's folded model with a round's runtime-writable tensors set: what ``hw weights`` writes.

The tensors go in by layer position; thresholds are rounded and clipped with the build's own data
types (finn-plus's RoundAndClipThresholds, as the build did), and every value is checked against
the bit width compiled into the accelerator (:class:`WeightsMismatch` says which layer and why).
Used by hw/weights.py (every round) and hw/recipe.py (when a build records its recipe).
"""

from __future__ import annotations

import numpy as np

from export.finn_env import prepare

prepare()

from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds  # noqa: E402
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402


class WeightsMismatch(ValueError):
    """The model does not match the compiled build (shapes, bit widths, folding, structure)."""


def is_runtime_writable(node) -> bool:
    inst = getCustomOp(node)
    return "runtime_writeable_weights" in inst.get_nodeattr_types() and inst.get_nodeattr(
        "runtime_writeable_weights") == 1


def patch(build_model: ModelWrapper, tensors: dict[int, np.ndarray]) -> tuple[ModelWrapper, list[dict]]:
    """The build's folded model with the runtime-writable tensors ``tensors`` (by layer position)
    set, thresholds rounded and clipped with the build's data types (RoundAndClipThresholds, as the
    build did); every value checked against the compiled bit width."""
    patched = ModelWrapper(build_model.model.__deepcopy__())
    nodes = list(patched.graph.node)
    record = []
    for pos, v in sorted(tensors.items()):
        b = nodes[pos]
        if not is_runtime_writable(b):
            raise WeightsMismatch(f"layer {b.name} ({b.op_type}) is not runtime-writable in the build")
        old = patched.get_initializer(b.input[1])
        if old.shape != v.shape:
            raise WeightsMismatch(f"layer {b.name}: parameter shape {list(v.shape)} != build's {list(old.shape)}")
        patched.set_initializer(b.input[1], np.asarray(v, dtype=np.float32))
        record.append({"layer": b.name, "op_type": b.op_type, "shape": list(v.shape),
                       "changed": int(np.count_nonzero(old != v))})
    wdt_before = {b.name: getCustomOp(b).get_nodeattr("weightDataType") for b in patched.graph.node
                  if "weightDataType" in getCustomOp(b).get_nodeattr_types()}
    patched = patched.transform(RoundAndClipThresholds())
    for b in patched.graph.node:
        if not is_runtime_writable(b):
            continue
        inst = getCustomOp(b)
        wdt_name = wdt_before.get(b.name)
        if wdt_name is None:
            continue
        if inst.get_nodeattr("weightDataType") != wdt_name:
            raise WeightsMismatch(f"layer {b.name}: threshold bit width {inst.get_nodeattr('weightDataType')}"
                                  f" != build's {wdt_name}")
        w = patched.get_initializer(b.input[1])
        if not _allowed(DataType[wdt_name], w):
            raise WeightsMismatch(f"layer {b.name}: values [{w.min():g}, {w.max():g}] do not fit the "
                                  f"compiled {wdt_name}")
    return patched, record


def final_tensors(build_model: ModelWrapper, tensors: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """The runtime-writable tensors as the build's folded model holds them, by layer name."""
    patched, _ = patch(build_model, tensors)
    nodes = list(patched.graph.node)
    return {nodes[pos].name: patched.get_initializer(nodes[pos].input[1]) for pos in tensors}


def _allowed(dt: DataType, arr: np.ndarray) -> bool:
    if dt == DataType["BIPOLAR"]:  # stored as {-1, +1} (XNOR layers: {0, 1})
        return bool(np.isin(arr, [-1, 0, 1]).all())
    if dt.is_integer():
        return bool(np.all(arr == np.round(arr)) and arr.min() >= dt.min() and arr.max() <= dt.max())
    return True
