"""Compile once, update every round: new runtime-weight files for an existing build.

``fedfinn hw weights BUILD MODEL`` takes a later round's QONNX model of the same
architecture and

1. checks it against the build's QONNX model (same nodes and attributes, same
   quantizer bit widths and signedness, same parameter shapes; a second);
   :class:`WeightsMismatch` names what differs;
2. computes the round's integer weights and thresholds:

   * **recipe** (the fast path): the build recorded how each runtime-writable
     tensor derives from the QONNX parameters (hw/recipe.py,
     ``<build>/weights_recipe.pkl``); replaying it is numpy on a few hundred
     operations. Every decision finn-plus took on parameter values is checked
     (guards);
   * **finn** (when there is no validated recipe or a guard comes out
     differently): finn-plus's front half on the model, recorded - its result is
     checked against the build's folded model node by node (layers, shapes, bit
     widths, attributes, non-writable parameters: :func:`check_and_patch`) and its
     recording becomes the build's recipe for the next rounds once validated;

3. copies the tensors into the build's folded model (folding, memory layout and
   data types stay), rounds and clips thresholds exactly as the build did
   (RoundAndClipThresholds with the build's data types) and checks every value
   fits the compiled bit width;
4. writes ``runtime_weights/*.dat`` with numpy from the layout the build measured
   (hw/datfiles.py: bit-identical to finn-plus's files), ``model.onnx`` (the
   updated folded model, for emulation) and ``weights.json``.

The board driver (``finn-plus-driver``: ``FINNDMAOverlay.load_runtime_weights``)
writes the ``.dat`` files over AXI-lite; no new bitstream.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from export.finn_env import prepare

prepare()

from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402

from . import recipe as R  # noqa: E402
from .patch import WeightsMismatch, is_runtime_writable, patch  # noqa: E402,F401  (WeightsMismatch: re-exported)
from .config import FINAL_STEP, find_intermediate, load_config  # noqa: E402
from .datfiles import LAYOUT_JSON, write_files  # noqa: E402


#: Node attributes that are implementation choices of the build (folding,
#: memories, generated code, estimates) - not part of what a layer computes.
IMPL_ATTRS = {
    "PE", "SIMD", "parallel_window", "mem_mode", "ram_style", "ram_style_thresholds", "ram_style_mask",
    "resType", "runtime_writeable_weights", "code_gen_dir_ipgen", "ipgen_path", "ip_path", "ip_vlnv",
    "code_gen_dir_cppsim", "executable_path", "cycles_estimate", "res_estimate", "res_hls",
    "res_synth", "rtlsim_so", "rtlsim_trace", "inFIFODepths", "outFIFODepths", "partition_id",
    "slr", "mem_port", "device_id", "exec_mode", "depth_trigger_uram", "depth_trigger_bram",
    "preferred_impl_style", "backend", "M", "impl_style", "mac_resource", "pumpedCompute",
    "pumpedMemory", "inp_fifo_depth", "out_fifo_depth",
}
#: Attributes compared as bit widths (reported as such).
DTYPE_ATTRS = {"weightDataType", "inputDataType", "outputDataType", "accDataType", "inputDataType0",
               "inputDataType1", "lhs_dtype", "rhs_dtype", "out_dtype"}


def _param_inputs(model: ModelWrapper, node) -> list[tuple[int, str]]:
    return [(i, t) for i, t in enumerate(node.input) if model.get_initializer(t) is not None]


def _attrs(node) -> dict:
    inst = getCustomOp(node)
    out = {}
    for a in node.attribute:
        if a.name in IMPL_ATTRS:
            continue
        try:
            v = inst.get_nodeattr(a.name)
        except Exception:
            continue
        out[a.name] = v
    return out


def check_and_patch(build_model: ModelWrapper, new_model: ModelWrapper) -> tuple[ModelWrapper, list[dict]]:
    """Compare ``new_model`` (the front half of the flow on a round's model) with the build's folded
    model; return the build's model with the new parameters (thresholds rounded and clipped as the
    build did), and the per-layer record."""
    from finn.util.verification import despecialize_model

    nb = [n for n in new_model.graph.node]
    ops_b = [n.op_type for n in despecialize_model(build_model).graph.node]
    ops_n = [n.op_type for n in despecialize_model(new_model).graph.node]
    if ops_b != ops_n:
        diff = [i for i in range(min(len(ops_b), len(ops_n))) if ops_b[i] != ops_n[i]]
        first = diff[0] if diff else min(len(ops_b), len(ops_n))
        raise WeightsMismatch(
            f"layer structure differs from the build: the build has {len(ops_b)} layers, the model gives "
            f"{len(ops_n)}; first difference at layer {first}: model "
            f"{ops_n[first] if first < len(ops_n) else '-'} vs build {ops_b[first] if first < len(ops_b) else '-'} "
            "(a different architecture: rebuild with `make hw`)")
    bshape = build_model.get_tensor_shape(build_model.graph.input[0].name)
    nshape = new_model.get_tensor_shape(new_model.graph.input[0].name)
    if list(bshape) != list(nshape):
        raise WeightsMismatch(f"input shape {nshape} differs from the build's {bshape}")

    patched = ModelWrapper(build_model.model.__deepcopy__())
    problems = []
    tensors = {}
    for pos, (b, n) in enumerate(zip(patched.graph.node, nb)):
        where = f"layer {b.name} ({b.op_type})"
        if b.op_type != n.op_type:
            problems.append(f"{where}: implemented as {n.op_type} for this model (bit widths changed?)")
        for kind, tb, tn in [("input", b.input[0], n.input[0]), ("output", b.output[0], n.output[0])]:
            sb, sn = patched.get_tensor_shape(tb), new_model.get_tensor_shape(tn)
            if list(sb) != list(sn):
                problems.append(f"{where}: {kind} shape {sn} != build's {sb}")
        ab, an = _attrs(b), _attrs(n)
        for k in sorted(set(ab) | set(an)):
            if ab.get(k) != an.get(k):
                what = "bit width" if k in DTYPE_ATTRS else "attribute"
                problems.append(f"{where}: {what} {k} = {an.get(k)} != build's {ab.get(k)}")
        pb, pn = _param_inputs(patched, b), _param_inputs(new_model, n)
        if [i for i, _ in pb] != [i for i, _ in pn]:
            problems.append(f"{where}: parameter inputs differ")
            continue
        rt = is_runtime_writable(b)
        for (i, tb), (_, tn) in zip(pb, pn):
            vb, vn = patched.get_initializer(tb), new_model.get_initializer(tn)
            if vb.shape != vn.shape:
                problems.append(f"{where}: parameter {i} shape {list(vn.shape)} != build's {list(vb.shape)}")
                continue
            if not rt:
                if not np.array_equal(vb, vn):
                    problems.append(f"{where}: parameter {i} changed but is not runtime-writable")
                continue
            if i == 1:
                tensors[pos] = vn
    if problems:
        raise WeightsMismatch("model does not match the build:\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return patch(build_model, tensors)


def _stamp(path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _cleaned(path: str, mtime_ns: int, size: int) -> ModelWrapper:
    """The build's QONNX model after qonnx's cleanup, once per process (it is compared every round)."""
    return cleanup_model(ModelWrapper(path))


def precheck(build_qonnx: str | Path, new_qonnx: str | Path) -> None:
    """First check at the QONNX level (no FINN step): the same nodes with the same attributes and
    wiring arity, the same quantizer bit widths and signedness, the same parameter shapes, the same
    integer constants (shapes, axes) as the model the build was compiled from. Raises
    :class:`WeightsMismatch`."""
    a = _cleaned(str(Path(build_qonnx).absolute()), *_stamp(build_qonnx))
    b = cleanup_model(ModelWrapper(str(new_qonnx)))
    problems = []
    sa = a.get_tensor_shape(a.graph.input[0].name)
    sb = b.get_tensor_shape(b.graph.input[0].name)
    if list(sa) != list(sb):
        problems.append(f"input shape {sb} != build's {sa}")
    ops_a, ops_b = [n.op_type for n in a.graph.node], [n.op_type for n in b.graph.node]
    if ops_a != ops_b:
        raise WeightsMismatch(f"model does not match the build: layer structure differs ({len(ops_b)} nodes "
                              f"vs the build's {len(ops_a)}; a different architecture: rebuild with `make hw`)")
    for na, nb in zip(a.graph.node, b.graph.node):
        if na.op_type in ("Quant", "BipolarQuant"):
            what = "weights" if a.get_initializer(na.input[0]) is not None else "activations"
            if na.op_type == "Quant":
                ba, bb = float(a.get_initializer(na.input[3])), float(b.get_initializer(nb.input[3]))
                if ba != bb:
                    problems.append(f"{nb.name} ({what}): bit width {bb:g} != build's {ba:g}")
                za, zb = a.get_initializer(na.input[2]), b.get_initializer(nb.input[2])
                if za is not None and zb is not None and not np.array_equal(za, zb):
                    problems.append(f"{nb.name} ({what}): zero point differs from the build's")
            if [(x.name, x.i) for x in na.attribute if x.name in ("signed", "narrow")] != \
                    [(x.name, x.i) for x in nb.attribute if x.name in ("signed", "narrow")]:
                problems.append(f"{nb.name} ({what}): signed/narrow range differs from the build's")
        elif sorted(str(x) for x in na.attribute) != sorted(str(x) for x in nb.attribute):
            problems.append(f"{nb.name}: attributes differ from the build's")
        if (len(na.input), len(na.output)) != (len(nb.input), len(nb.output)):
            problems.append(f"{nb.name}: inputs/outputs differ from the build's")
        for i, (ta, tb) in enumerate(zip(na.input, nb.input)):
            va, vb = a.get_initializer(ta), b.get_initializer(tb)
            if (va is None) != (vb is None):
                problems.append(f"{nb.name}: input {i} is {'a parameter' if vb is not None else 'computed'}, "
                                "unlike the build's")
            elif va is not None and va.shape != vb.shape:
                problems.append(f"{nb.name}: parameter {i} shape {list(vb.shape)} != build's {list(va.shape)}")
            elif va is not None and va.dtype.kind in "iu" and not np.array_equal(va, vb):
                problems.append(f"{nb.name}: integer constant {i} differs from the build's")
    if problems:
        raise WeightsMismatch("model does not match the build:\n  " + "\n  ".join(problems[:20]))


def _positions(model: ModelWrapper) -> dict[int, str]:
    return {pos: n.name for pos, n in R.runtime_layers(model)}


def round_tensors(build_dir: Path, cfg, model: Path, folded: ModelWrapper, use_recipe: bool = True) -> dict:
    """The round's runtime-writable tensors by layer position, and how they were obtained."""
    recipe_path = Path(build_dir) / R.RECIPE_FILE
    why = "recipe disabled"
    if use_recipe:
        try:
            recipe = R.load(recipe_path)
            if not recipe.validated:
                raise R.RecipeError(f"recipe not validated ({recipe.validation})")
            t0 = time.time()
            leaves = R.initializers(ModelWrapper(str(model)))
            tensors = R.replay(recipe, leaves)
            positions = _positions(folded)
            if sorted(tensors) != sorted(positions):
                raise R.RecipeError("recipe layers do not match the build's runtime-writable layers")
            return {"tensors": tensors, "path": "recipe", "seconds_tensors": round(time.time() - t0, 3)}
        except FileNotFoundError:
            why = f"no recipe in {build_dir}"
        except (R.RecipeError, R.GuardFailed) as e:
            why = f"{type(e).__name__}: {e}"
    # finn-plus's front half, recorded: exact tensors, full structural check, and a new recipe. Its
    # steps live in hw.build with finn's builder, which the recipe path above never needs (seconds of
    # imports per round saved): imported only here.
    from .build import front_half

    t0 = time.time()
    new, recipe = R.trace_front_half(cfg, model, front_half)
    patched, _ = check_and_patch(folded, new)  # raises WeightsMismatch
    nodes = list(new.graph.node)
    tensors = {pos: new.get_initializer(nodes[pos].input[1]) for pos, _ in R.runtime_layers(new)}
    res = {"tensors": tensors, "path": "finn", "why_not_recipe": why, "seconds_tensors": round(time.time() - t0, 3)}
    if use_recipe:
        with tempfile.TemporaryDirectory(prefix="fedfinn-recipe-") as tmp:
            recipe.validation = R.validate(cfg, recipe, model, Path(tmp), front_half)
        if recipe.validated:
            R.save(recipe, recipe_path)
        res["new_recipe"] = recipe.validation
    return res


def update_weights(build_dir: str | Path, model: str | Path, out_dir: str | Path | None = None,
                   echo=None, use_recipe: bool = True) -> dict:
    """New runtime-weight files for ``model`` on the build in ``build_dir``."""
    t0 = time.time()
    build_dir = Path(build_dir)
    cfg = load_config(build_dir)
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(model)
    out_dir = Path(out_dir) if out_dir else build_dir / "rounds" / model.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model_path and Path(cfg.model_path).exists():
        precheck(cfg.model_path, model)  # refuses mismatching models in a second
    t_check = time.time() - t0
    folded = ModelWrapper(str(find_intermediate(build_dir, FINAL_STEP)))
    got = round_tensors(build_dir, cfg, model, folded, use_recipe=use_recipe)
    patched, record = patch(folded, got["tensors"])
    t_patch = time.time() - t0
    built_dir = build_dir / "driver" / "runtime_weights"
    if not (built_dir / LAYOUT_JSON).exists():
        raise FileNotFoundError(f"{built_dir / LAYOUT_JSON} not found: the build has no runtime-weight layout")
    if (out_dir / "runtime_weights").exists():
        shutil.rmtree(out_dir / "runtime_weights")
    made = write_files(patched, built_dir, out_dir / "runtime_weights")
    t_files = time.time() - t0
    patched.save(str(out_dir / "model.onnx"))
    shutil.copy(build_dir / "driver" / "settings.json", out_dir / "settings.json")
    built = sorted(p.name for p in built_dir.glob("*.dat"))
    if built != made:
        raise WeightsMismatch(f"runtime-weight files differ from the build's: {made} vs {built}")
    sizes_equal = all((built_dir / f).stat().st_size == (out_dir / "runtime_weights" / f).stat().st_size
                      for f in made)
    res = {
        "build": str(build_dir),
        "model": str(model.absolute()),
        "out_dir": str(out_dir),
        "runtime_weight_files": made,
        "file_sizes_match_build": sizes_equal,
        "layers_updated": record,
        "path": got["path"],
        **{k: got[k] for k in ("why_not_recipe", "new_recipe") if k in got},
        "seconds": round(time.time() - t0, 3),
        "seconds_precheck": round(t_check, 3),
        "seconds_tensors": got["seconds_tensors"],
        "seconds_patch": round(t_patch - t_check - got["seconds_tensors"], 3),
        "seconds_dat_files": round(t_files - t_patch, 3),
    }
    (out_dir / "weights.json").write_text(json.dumps(res, indent=2))
    return res
