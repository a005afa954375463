"""Compile once, update every round: new runtime-weight files for an existing build.

``fedfinn hw weights BUILD MODEL`` takes a later round's QONNX model of the
same architecture and

1. runs the build's front half on it (preprocess ... specialize layers: no
   folding search, no code generation - seconds);
2. checks it against the build's folded model node by node: same layers in
   the same order, same tensor shapes, same data types (weight, activation,
   accumulator bit widths), same non-weight attributes, same values of every
   parameter that is not runtime-writable. Any difference raises
   :class:`WeightsMismatch` naming the layer and what differs: the bitstream
   would compute something else, so the model needs a new ``make hw``;
3. copies the new weights and thresholds into the build's folded model (its
   folding, memory layout and data types stay), rounds and clips thresholds
   exactly as the build did (RoundAndClipThresholds with the build's data
   types) and checks every value fits the compiled bit width;
4. writes ``runtime_weights/*.dat`` (finn-plus's MakePYNQDriver, the same files
   and names the build wrote), ``model.onnx`` (the updated folded model, for
   emulation) and ``weights.json`` into the output folder.

The board driver (``finn-plus-driver``: ``FINNDMAOverlay.load_runtime_weights``)
writes the ``.dat`` files over AXI-lite; no new bitstream.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from export.finn_env import prepare

prepare()

from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds  # noqa: E402
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402
from finn.util.verification import despecialize_model  # noqa: E402

from .build import FINAL_STEP, HW_STEPS, HwBuildConfig, find_intermediate, make_config, make_driver_files, run_steps  # noqa: E402,E501
from .datfiles import LAYOUT_JSON, LAYOUT_NPZ  # noqa: E402
from .packing import fast_packing  # noqa: E402


class WeightsMismatch(ValueError):
    """The model does not match the compiled build (shapes, bit widths, folding, structure)."""


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


def load_config(build_dir: str | Path) -> HwBuildConfig:
    build_dir = Path(build_dir)
    p = build_dir / "build_config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: {build_dir} is not a finished `make hw` build")
    rec = json.loads(p.read_text())
    kw = {k: rec[k] for k in ("dataset", "mean", "std", "preprocess_io", "runtime_weights", "fit_to_board",
                              "max_target_fps", "usable", "minimize_bit_width") if k in rec}
    cfg = make_config(rec["model_path"], board=rec["board"], output_dir=build_dir, name=rec["name"],
                      target_fps=rec["target_fps"], clock_mhz=1000.0 / rec["synth_clk_period_ns"],
                      folding_config=rec.get("folding_config_file"), mvau_wwidth_max=rec["mvau_wwidth_max"], **kw)
    cfg.step_times = rec.get("step_times", {})
    return cfg


def _front_steps() -> list[str]:
    return HW_STEPS[: HW_STEPS.index("step_specialize_layers") + 1]


def _param_inputs(model: ModelWrapper, node) -> list[tuple[int, str]]:
    return [(i, t) for i, t in enumerate(node.input) if model.get_initializer(t) is not None]


def _is_rt(node) -> bool:
    inst = getCustomOp(node)
    return "runtime_writeable_weights" in inst.get_nodeattr_types() and inst.get_nodeattr(
        "runtime_writeable_weights") == 1


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
    """Compare ``new_model`` (front half of the flow) with the build's folded model;
    return the build's model with the new parameters, and the per-layer record."""
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
    record = []
    for b, n in zip(patched.graph.node, nb):
        where = f"layer {b.name} ({b.op_type})"
        if b.op_type != n.op_type:
            problems.append(f"{where}: implemented as {n.op_type} for this model (bit widths changed?)")
        # tensor shapes of data inputs/outputs
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
        rt = _is_rt(b)
        for (i, tb), (_, tn) in zip(pb, pn):
            vb, vn = patched.get_initializer(tb), new_model.get_initializer(tn)
            if vb.shape != vn.shape:
                problems.append(f"{where}: parameter {i} shape {list(vn.shape)} != build's {list(vb.shape)}")
                continue
            if not rt:
                if not np.array_equal(vb, vn):
                    problems.append(f"{where}: parameter {i} changed but is not runtime-writable")
                continue
            patched.set_initializer(tb, vn.astype(np.float32))
            record.append({"layer": b.name, "op_type": b.op_type, "input": i, "shape": list(vn.shape),
                           "changed": int(np.count_nonzero(vb != vn))})
    if problems:
        raise WeightsMismatch("model does not match the build:\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    # thresholds: ceil + clip to the build's input ranges, as the build did
    wdt_before = {b.name: getCustomOp(b).get_nodeattr("weightDataType") for b in patched.graph.node
                  if "weightDataType" in getCustomOp(b).get_nodeattr_types()}
    patched = patched.transform(RoundAndClipThresholds())
    # every new value must fit the compiled bit width
    for b in patched.graph.node:
        if not _is_rt(b):
            continue
        inst = getCustomOp(b)
        wdt_name = wdt_before.get(b.name)
        if wdt_name is None:
            continue
        if inst.get_nodeattr("weightDataType") != wdt_name:
            raise WeightsMismatch(f"layer {b.name}: threshold bit width {inst.get_nodeattr('weightDataType')}"
                                  f" != build's {wdt_name}")
        w = patched.get_initializer(b.input[1])
        wdt = DataType[wdt_name]
        if not _allowed(wdt, w):
            raise WeightsMismatch(f"layer {b.name}: values [{w.min():g}, {w.max():g}] do not fit the "
                                  f"compiled {wdt_name}")
    return patched, record


def _allowed(dt: DataType, arr: np.ndarray) -> bool:
    if dt == DataType["BIPOLAR"]:  # stored as {-1, +1} (XNOR layers: {0, 1})
        return bool(np.isin(arr, [-1, 0, 1]).all())
    if dt.is_integer():
        return bool(np.all(arr == np.round(arr)) and arr.min() >= dt.min() and arr.max() <= dt.max())
    return True


def write_runtime_weights(model: ModelWrapper, like_dir: Path, out_dir: Path) -> list[str] | None:
    """Write the build's runtime-weight files (``like_dir``: its driver's ``runtime_weights/``, with the
    layout hw.datfiles measured) from the layers of the same names in ``model``, with finn-plus's own
    ``make_weight_file(..., "decoupled_runtime", ...)`` - what MakePYNQDriver calls, without re-running
    the driver's graph preparation. The layout files are copied along. None if a layer is missing."""
    layout = json.loads((Path(like_dir) / LAYOUT_JSON).read_text())["files"]
    jobs = []
    for fname, meta in sorted(layout.items()):
        node = model.get_node_from_name(meta["layer"])
        if node is None or not _is_rt(node):
            return None
        jobs.append((fname, node))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with fast_packing():
        for fname, node in jobs:
            getCustomOp(node).make_weight_file(model.get_initializer(node.input[1]), "decoupled_runtime",
                                               str(Path(out_dir) / fname))
    for name in (LAYOUT_JSON, LAYOUT_NPZ):
        shutil.copy(Path(like_dir) / name, Path(out_dir) / name)
    return [f for f, _ in jobs]


def precheck(build_qonnx: str | Path, new_qonnx: str | Path) -> None:
    """Cheap first check at the QONNX level (no FINN step): the same nodes, the
    same quantizer bit widths and the same parameter shapes as the model the
    build was compiled from. Raises :class:`WeightsMismatch`; the full,
    authoritative check (:func:`check_and_patch`) follows anyway."""
    a = cleanup_model(ModelWrapper(str(build_qonnx)))
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
            if [(x.name, x.i) for x in na.attribute if x.name in ("signed", "narrow")] != \
                    [(x.name, x.i) for x in nb.attribute if x.name in ("signed", "narrow")]:
                problems.append(f"{nb.name} ({what}): signed/narrow range differs from the build's")
        for i, (ta, tb) in enumerate(zip(na.input, nb.input)):
            va, vb = a.get_initializer(ta), b.get_initializer(tb)
            if va is not None and vb is not None and va.shape != vb.shape:
                problems.append(f"{nb.name}: parameter {i} shape {list(vb.shape)} != build's {list(va.shape)}")
    if problems:
        raise WeightsMismatch("model does not match the build:\n  " + "\n  ".join(problems[:20]))


def update_weights(build_dir: str | Path, model: str | Path, out_dir: str | Path | None = None,
                   echo=None) -> dict:
    """New runtime-weight files for ``model`` on the build in ``build_dir``."""
    t0 = time.time()
    build_dir = Path(build_dir)
    cfg = load_config(build_dir)
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(model)
    out_dir = Path(out_dir) if out_dir else build_dir / "rounds" / model.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    build_model = ModelWrapper(str(find_intermediate(build_dir, FINAL_STEP)))
    if cfg.model_path and Path(cfg.model_path).exists():
        precheck(cfg.model_path, model)  # refuses obvious mismatches in a second

    with tempfile.TemporaryDirectory(prefix="fedfinn-weights-") as tmp:
        wcfg = load_config(build_dir)
        wcfg.output_dir = str(Path(tmp) / "work")
        wcfg.model_path = model.absolute()
        wcfg.save_intermediate_models = False
        new = run_steps(wcfg, steps=_front_steps(), model=ModelWrapper(str(model)), echo=echo, record=None)
        t_front = time.time() - t0
        patched, record = check_and_patch(build_model, new)
        patched.save(str(out_dir / "model.onnx"))
        t_patch = time.time() - t0
        if (out_dir / "runtime_weights").exists():
            shutil.rmtree(out_dir / "runtime_weights")
        built_dir = build_dir / "driver" / "runtime_weights"
        made = write_runtime_weights(patched, built_dir, out_dir / "runtime_weights")
        if made is None:  # layer names do not map: the full driver generation
            drv_tmp = Path(tmp) / "driver"
            cfg.output_dir = str(Path(tmp) / "drv")  # partitions of the driver model go to the temp dir
            make_driver_files(patched, cfg, drv_tmp)
            shutil.copytree(drv_tmp / "runtime_weights", out_dir / "runtime_weights")
        shutil.copy(build_dir / "driver" / "settings.json", out_dir / "settings.json")
    built = sorted(p.name for p in built_dir.glob("*.dat"))
    made = sorted(p.name for p in (out_dir / "runtime_weights").glob("*.dat"))
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
        "seconds": round(time.time() - t0, 2),
        "seconds_front_steps": round(t_front, 2),
        "seconds_check_and_patch": round(t_patch - t_front, 2),
    }
    (out_dir / "weights.json").write_text(json.dumps(res, indent=2))
    return res
