"""QONNX file -> FINN-ONNX file (finn-plus's ConvertQONNXtoFINN + tidy-up).

``to_finn_onnx(qonnx_path, out_path)``:

1. refuses graphs FINN cannot compile (``qonnx_export.finn_blockers``) with
   a ``NotDeployableError`` that says why and which model to use instead;
2. ``ConvertQONNXtoFINN`` (weights folded to integers + scale Muls, activation
   Quant nodes -> MultiThreshold + Add + Mul);
3. ``MatchQuantTieRounding`` (below);
4. tidy-up: InferShapes, FoldConstants, GiveUniqueNodeNames,
   GiveReadableTensorNames, InferDataTypes, RemoveStaticGraphInputs.

The result is the input of FINN's streamlining / dataflow build (hw/).

Ties: a Quant node rounds half to even (Brevitas and QONNX: ``ROUND``), a
MultiThreshold counts ``x >= t``, so FINN's converter rounds every exact tie
upwards. With the power-of-two scales of the deployable models, ties are
exact events (a BatchNorm output landing exactly on a half step; ~1 in 10^6
activations at 8 bits) and each one moved a logit by ~1e-3.
``MatchQuantTieRounding`` moves every threshold whose tie must round down
(the integer below it is even) up by one float32 ulp, so ``x >= t'`` is
``x > t`` and the FINN-ONNX graph takes exactly the QONNX graph's decisions.
No other value changes.

finn is imported lazily: without finn-plus, ``to_finn_onnx`` raises
``FinnUnavailableError`` naming the package and ``make install-hw``. Its
environment (``FINN_BUILD_DIR``, settings) is export.finn_env's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.fold_constants import FoldConstants
from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames, RemoveStaticGraphInputs
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.transformation.infer_shapes import InferShapes

from .finn_env import finn_missing
from .qonnx_export import NotDeployableError, finn_blockers, not_deployable_message


class FinnUnavailableError(RuntimeError):
    pass


def _convert_qonnx_to_finn():
    """finn-plus's ConvertQONNXtoFINN; finn-plus is optional (make install-hw), so it is imported here."""
    why = finn_missing()
    if why is not None:
        raise FinnUnavailableError(why)
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN

    return ConvertQONNXtoFINN


def match_quant_tie_rounding(wrapper) -> int:
    """Nudge MultiThreshold thresholds so exact ties round half to even, like the Quant nodes did.

    Applies to every MultiThreshold whose thresholds sit exactly on half steps
    (k + 1/2) * s of its output scale s (the Mul after it; 1 if none).
    Returns the number of thresholds moved.
    """
    moved = 0
    for node in wrapper.get_nodes_by_op_type("MultiThreshold"):
        attrs = {a.name: a for a in node.attribute}
        if "out_scale" in attrs and attrs["out_scale"].f not in (0.0, 1.0):
            continue  # bipolar: one threshold at 0, sign(0) = +1 in Brevitas too
        scale = _output_scale(wrapper, node)
        if scale is None:
            continue
        thr = wrapper.get_initializer(node.input[1])
        if thr is None:
            continue
        thr = thr.astype(np.float32)
        steps = thr.astype(np.float64) / scale.reshape(-1, 1) - 0.5  # the integer k below each threshold
        on_half = steps == np.round(steps)
        round_down = on_half & (np.mod(np.round(steps), 2) == 0)
        if round_down.any():
            thr = np.where(round_down, np.nextafter(thr, np.float32(np.inf)), thr).astype(np.float32)
            wrapper.set_initializer(node.input[1], thr)
            moved += int(round_down.sum())
    return moved


def _output_scale(wrapper, mt_node) -> np.ndarray | None:
    """The scale s of MT -> [Add bias] -> [Mul s], per threshold row (None if not a plain scalar/row)."""
    consumers = wrapper.find_consumers(mt_node.output[0]) or []
    node = consumers[0] if len(consumers) == 1 else None
    if node is not None and node.op_type == "Add" and wrapper.get_initializer(node.input[1]) is not None:
        consumers = wrapper.find_consumers(node.output[0]) or []
        node = consumers[0] if len(consumers) == 1 else None
    if node is not None and node.op_type == "Mul":
        s = wrapper.get_initializer(node.input[1])
        if s is None:
            return None
        return np.abs(np.asarray(s, dtype=np.float64)).reshape(-1)
    return np.ones(1)


def to_finn_onnx(qonnx_path: str | Path, out_path: str | Path, what: str | None = None):
    """Convert a QONNX file to FINN-ONNX at ``out_path``; returns the ModelWrapper."""
    wrapper = ModelWrapper(str(qonnx_path))
    reasons = finn_blockers(wrapper)
    if reasons:
        raise NotDeployableError(not_deployable_message(what or f"the graph {qonnx_path}", reasons))
    ConvertQONNXtoFINN = _convert_qonnx_to_finn()
    wrapper = wrapper.transform(ConvertQONNXtoFINN())
    match_quant_tie_rounding(wrapper)
    for step in (InferShapes(), FoldConstants(), GiveUniqueNodeNames(), GiveReadableTensorNames(),
                 InferDataTypes(), RemoveStaticGraphInputs()):
        wrapper = wrapper.transform(step)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    wrapper.save(str(tmp))
    os.replace(tmp, out_path)
    return wrapper
