"""The FINN flow: a build configuration plus a list of named steps.

A build runs on finn-plus's own builder: :class:`HwBuildConfig` *is* a FINN
``DataflowBuildConfig`` (a subclass with a few fields of ours, serialized with the
config's own ``to_json``/``from_json`` as ``build_config.json``), a build is a list
of step names, the steps written here are registered in finn-plus's step registry
(``register_build_dataflow_step``), finn-plus's ``resolve_build_steps`` resolves
them (with ``start_step``/``stop_step``), and ``build_dataflow_cfg`` runs them and
leaves every step's model in ``<output_dir>/intermediate_models/<step>.onnx``
(:func:`find_intermediate` is the one lookup).

Steps written here (everything else is finn-plus):

* ``step_preprocess_io`` - the graph input becomes the raw image (UINT8, NHWC,
  as stored in CIFAR arrays and as a camera or the board delivers it); the
  normalization ``(x/255 - mean)/std`` is prepended as Transpose/Mul/Add and
  streamlining folds it, with the model's 8-bit input quantizer, into the first
  thresholds. A TopK(1) is appended, so the accelerator returns the class index
  and the classifier's positive scalar scale folds away.
* ``step_streamline_residual`` - FINN's ``step_streamline``, then the extra
  reorderings residual networks need (scalar/channel-wise linear ops moved past
  residual adds and into thresholds) until no float op is left between layers.
* ``step_runtime_writeable`` - every weight layer (MVAU/VVAU) and threshold
  layer gets ``mem_mode=internal_decoupled`` and ``runtime_writeable_weights=1``:
  compile once, load each round's weights over AXI-lite.
* ``step_fold_to_budget`` - FINN's ``SetFolding`` for a target FPS, searched
  (bisection on the target) for the fastest folding whose resources fit the
  board's budget (:data:`hw.boards.USABLE` of its capacity), counted on the graph
  as the bitstream flow builds it - width converters, FIFOs, DMAs, shell and
  AXI-lite adapters included (hw/budget.py). Weight streams are capped at
  ``mvau_wwidth_max`` bits per PE (finn-plus's default, 36).
* ``step_pynq_driver`` - the PYNQ driver's ``settings.json`` and the
  ``runtime_weights/*.dat`` files, made by finn-plus's ``MakePYNQDriver`` on
  the model prepared as the bitstream flow prepares it (FIFOs and width
  converters as ``step_set_fifo_depths`` inserts them, then ``ZynqBuild``'s
  IODMAs, floorplan, partitions) - no Vivado needed.
* ``step_record_weights_recipe`` - how each runtime-writable tensor derives from
  the QONNX model's parameters (hw/recipe.py), so later rounds get their
  ``.dat`` files without FINN's front half.
* ``step_report`` - ``report/hw_report.json`` and ``report/hw_report.md``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from export.finn_env import prepare, use_finn_build_dir

prepare()  # FINN_BUILD_DIR, settings and the no-Vivado work-around, before finn.builder

from finn.builder.build_dataflow import build_dataflow_cfg, resolve_build_steps  # noqa: E402
from finn.builder.build_dataflow_steps import build_dataflow_step_lookup, register_build_dataflow_step  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.transformation.insert_topk import InsertTopK  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402
from finn.transformation.streamline import Streamline  # noqa: E402
from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds  # noqa: E402
from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames, RemoveUnusedTensors  # noqa: E402
from qonnx.transformation.infer_data_layouts import InferDataLayouts  # noqa: E402
from qonnx.transformation.infer_datatypes import InferDataTypes  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402
import finn.transformation.streamline.absorb as A  # noqa: E402
import finn.transformation.streamline.reorder as R  # noqa: E402
from finn.util.fpgadataflow import is_fpgadataflow_node  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402
from finn.transformation.fpgadataflow.set_folding import SetFolding  # noqa: E402
from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive  # noqa: E402
from finn.util.basic import getHWCustomOp  # noqa: E402
from finn.util.fpgadataflow import is_hls_node, is_rtl_node  # noqa: E402
from finn.util.config import extract_model_config_to_json  # noqa: E402
from finn.transformation.fpgadataflow.create_dataflow_partition import CreateDataflowPartition  # noqa: E402
from finn.transformation.fpgadataflow.floorplan import Floorplan  # noqa: E402
from finn.transformation.fpgadataflow.make_driver import MakePYNQDriver  # noqa: E402

from .config import (  # noqa: E402,F401  (re-exported: hw.build is where the flow lives)
    BITSTREAM_STEPS,
    FINAL_STEP,
    FRONT_STOP_STEP,
    HW_STEPS,
    WEIGHT_STREAM_CAP_BITS,
    HwBuildConfig,
    HwBuildError,
    RuntimeWeightsUnsupported,
    find_intermediate,
    intermediate_path,
    load_config,
    make_config,
    save_config,
)
from .budget import bitstream_graph, budget_table  # noqa: E402
from .datfiles import write_layout  # noqa: E402
from .estimate import estimate  # noqa: E402
from .folding import cheapest_mvau_folding  # noqa: E402
from .packing import fast_packing  # noqa: E402
from .recipe import record_for_build  # noqa: E402
from .report import markdown, write_report  # noqa: E402
from .transforms import MergeIdenticalTransposes, ReduceMeanToGlobalAccPool  # noqa: E402

log = logging.getLogger("fedfinn.hw")

# --------------------------------------------------------------------------
# steps in finn-plus's registry; finn-plus's runner
# --------------------------------------------------------------------------


def register_step(fn: Callable[[ModelWrapper, HwBuildConfig], ModelWrapper]):
    """Register a step of this module in finn-plus's step registry (by its function name).

    finn-plus refuses a second registration of a name; re-importing this module (e.g.
    ``importlib.reload``) registers the new function in place of the old one."""
    old = build_dataflow_step_lookup.get(fn.__name__)
    if old is not None:
        if getattr(old, "__module__", None) != fn.__module__:
            raise ValueError(f"step {fn.__name__} is already registered by {old.__module__}")
        del build_dataflow_step_lookup[fn.__name__]
    return register_build_dataflow_step()(fn)


@contextlib.contextmanager
def contained_finn_runner(echo: Callable[[str], None] | None = print) -> Iterator[None]:
    """Run finn-plus's ``build_dataflow_cfg`` in-process without it changing the process for good.

    finn-plus 1.6.1's ``setup_logging`` replaces the root logger's handlers (``basicConfig(force=True)``
    with the build's log file, plus a rich console handler), captures ``warnings``, wraps
    ``sys.stdout``/``sys.stderr`` in its ``PrintLogger`` and swaps finn's rich console - and leaves
    all of that in place after a successful build. ``fedfinn`` runs builds in-process (server, tests),
    so everything is put back here: streams, root handlers and level (finn's are closed), warning
    capture, finn's console. ``echo=None`` sends finn's console output to nowhere (its log file keeps
    it). tests/test_hw.py checks that logging and the streams are the same before and after a build."""
    import finn.util.logging as finn_logging

    root = logging.getLogger()
    saved = (sys.stdout, sys.stderr, list(root.handlers), root.level, finn_logging.get_console())
    warnings_captured = getattr(logging, "_warnings_showwarning", None) is not None
    sink = None
    if echo is None:
        sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
        sys.stdout = sink
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in saved[2]:
                root.removeHandler(h)
                with contextlib.suppress(Exception):
                    h.close()
        for h in saved[2]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved[3])
        logging.captureWarnings(warnings_captured)
        sys.stdout, sys.stderr = saved[0], saved[1]
        finn_logging.set_console(saved[4])
        if sink is not None:
            sink.close()


def _build_error(cfg: HwBuildConfig) -> str:
    logfile = Path(cfg.output_dir) / "build_dataflow.log"
    lines = logfile.read_text(errors="replace").splitlines() if logfile.exists() else []
    errors = [ln for ln in lines if "ERROR" in ln]
    return (errors[-1] if errors else "no error line in the log") + f" (log: {logfile})"


def run_build(cfg: HwBuildConfig, echo: Callable[[str], None] | None = print) -> Path:
    """Run ``cfg.steps`` (from ``cfg.start_step`` to ``cfg.stop_step``) with finn-plus's
    ``build_dataflow_cfg``; returns the output folder. Raises :class:`HwBuildError` on failure
    (inside pytest finn-plus re-raises the step's own exception)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    use_finn_build_dir(out / "finn_tmp")  # generated code stays inside the build folder
    with contained_finn_runner(echo):
        rc = build_dataflow_cfg(str(cfg.model_path), cfg)
    if rc != 0:
        raise HwBuildError(f"build of {cfg.name} failed: {_build_error(cfg)}")
    return out


def run_steps_in_process(cfg: HwBuildConfig, model: ModelWrapper) -> ModelWrapper:
    """The steps finn-plus's ``resolve_build_steps`` gives for ``cfg`` (``cfg.steps`` from
    ``start_step`` to ``stop_step``), applied to ``model`` in memory: no log file, no saved models.
    Used where a build's front half runs on another model (``hw weights``)."""
    for fn in resolve_build_steps(cfg):
        model = fn(model, cfg)
    return model


def front_half(cfg: HwBuildConfig, model: ModelWrapper) -> ModelWrapper:
    """The build's front half (preprocessing ... specialize layers) on ``model``. The few files these
    steps write (partition models, a specialization template) go to a temporary folder, not into
    the build."""
    import tempfile

    wcfg = copy.deepcopy(cfg)
    wcfg.steps, wcfg.start_step, wcfg.stop_step = list(HW_STEPS), None, FRONT_STOP_STEP
    with tempfile.TemporaryDirectory(prefix="fedfinn-front-") as tmp:
        wcfg.output_dir = tmp
        return run_steps_in_process(wcfg, model)


def build(cfg: HwBuildConfig, echo: Callable[[str], None] | None = print) -> dict:
    """``make hw``: run all steps; return the report dict (and print the budget with ``echo``)."""
    t0 = time.time()
    save_config(cfg)
    run_build(cfg, echo=echo)
    rep_dir = Path(cfg.output_dir) / "report"
    report_path = rep_dir / "hw_report.json"
    if not report_path.exists():  # a partial build (no step_report)
        return {}
    rep = json.loads(report_path.read_text())
    rep["build_seconds"] = round(time.time() - t0, 2)
    tps = rep_dir / "time_per_step.json"
    if tps.exists():
        rep["step_times_s"] = json.loads(tps.read_text())
    report_path.write_text(json.dumps(rep, indent=2))
    (rep_dir / "hw_report.md").write_text(markdown(rep))
    if echo:
        for line in budget_table(rep["budget"]):
            echo(line)
    return rep


# --------------------------------------------------------------------------
# steps written here
# --------------------------------------------------------------------------


@register_step
def step_preprocess_io(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """Raw UINT8 NHWC image in (normalization prepended), class index out (TopK 1)."""
    model = cleanup_model(model)
    if not cfg.preprocess_io:
        return model
    if model.get_metadata_prop("fedfinn_preprocess") == "1":
        return model  # already done
    if len(model.graph.input) != 1:
        raise ValueError("step_preprocess_io expects a model with one input")
    inp = model.graph.input[0]
    shape = model.get_tensor_shape(inp.name)
    if len(shape) != 4:
        raise ValueError(f"step_preprocess_io expects an NCHW image input, got shape {shape}")
    n, c, h, w = shape
    mean, std = cfg.input_stats()
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries, the input has {c} channels")
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    # x_norm = (x/255 - mean)/std = x * (1/(255 std)) + (-mean/std), per channel
    mul = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, c, 1, 1)
    add = (-mean / std).astype(np.float32).reshape(1, c, 1, 1)

    old_in = inp.name
    new_in = "global_in_uint8"
    g = model.graph
    t_nchw = model.make_new_valueinfo_name()
    t_mul = model.make_new_valueinfo_name() + "_scaled"
    mul_name = "preproc_scale"
    add_name = "preproc_shift"
    nodes = [
        helper.make_node("Transpose", [new_in], [t_nchw], perm=[0, 3, 1, 2], name="preproc_nhwc_to_nchw"),
        helper.make_node("Mul", [t_nchw, mul_name], [t_mul], name="preproc_mul"),
        helper.make_node("Add", [t_mul, add_name], [old_in], name="preproc_add"),
    ]
    for k, node in enumerate(nodes):
        g.node.insert(k, node)
    g.input.remove(inp)
    g.input.insert(0, helper.make_tensor_value_info(new_in, TensorProto.FLOAT, [n, h, w, c]))
    g.value_info.append(helper.make_tensor_value_info(old_in, TensorProto.FLOAT, [n, c, h, w]))
    model.set_initializer(mul_name, mul)
    model.set_initializer(add_name, add)
    model.set_tensor_datatype(new_in, DataType["UINT8"])
    model.set_tensor_layout(new_in, ["N", "H", "W", "C"])
    model = model.transform(InsertTopK(k=1))
    model = cleanup_model(model)
    model.set_metadata_prop("fedfinn_preprocess", "1")
    model.set_metadata_prop("fedfinn_input", json.dumps({"dtype": "UINT8", "layout": "NHWC",
                                                         "mean": mean.tolist(), "std": std.tolist()}))
    return model


@register_step
def step_streamline_residual(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """FINN's step_streamline, then the rewrites residual models need.

    After FINN's streamlining a residual network still has NCHW islands: the
    Transposes that conv lowering puts on both branches of a fork and on both
    inputs of an Add, a MaxPool behind the Add's activation, and the global
    average pool (ReduceMean) with the last activation's scale in front.
    The extra passes (finn-plus's, except the two in hw/transforms.py) merge
    duplicate Transposes, move Transposes past forks and adds into the
    thresholds, make the max-pools NHWC, turn the global average pool into an
    integer GlobalAccPool and move the remaining scalar scale into the TopK.
    They repeat until nothing changes. A graph that is already clean (CNV)
    passes through unchanged.
    """
    model = build_dataflow_step_lookup["step_streamline"](model, cfg)
    if not _needs_residual_passes(model):
        return model
    passes = _residual_transforms()
    for _ in range(4):
        before = [n.op_type for n in model.graph.node]
        for t in passes:
            model = model.transform(t)
            model = model.transform(InferShapes())
            model = model.transform(InferDataLayouts())
            model = model.transform(InferDataTypes())
        if _float_ops(model):  # scales moved next to thresholds: absorb them
            model = model.transform(Streamline())
        if [n.op_type for n in model.graph.node] == before:
            break
    model = model.transform(RemoveUnusedTensors())
    model = model.transform(GiveUniqueNodeNames())
    model = model.transform(GiveReadableTensorNames())
    left = _float_ops(model)
    if left:
        log.warning("float ops left after streamlining: %s", ", ".join(left))
    return model


def _needs_residual_passes(model: ModelWrapper) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"Add", "ReduceMean", "GlobalAveragePool", "MaxPool"}) or bool(_float_ops(model)) or any(
        n.op_type == "Transpose" and len(model.find_consumers(n.output[0]) or []) != 1 for n in model.graph.node
    ) or sum(n.op_type == "Transpose" for n in model.graph.node) > 1


def _residual_transforms():

    return [
        R.MoveScalarLinearPastFork(),
        R.MoveLinearPastFork(),
        R.MoveMulPastJoinAdd(),
        R.MoveLinearPastEltwiseAdd(),
        MergeIdenticalTransposes(),
        R.MoveTransposePastFork(),
        A.AbsorbConsecutiveTransposes(),
        R.MoveTransposePastJoinAdd(),
        A.AbsorbTransposeIntoMultiThreshold(),
        MergeIdenticalTransposes(),
        R.MakeMaxPoolNHWC(),
        A.AbsorbConsecutiveTransposes(),
        ReduceMeanToGlobalAccPool(),
        R.MoveScalarLinearPastInvariants(),
        R.MoveScalarMulPastMatMul(),
        A.AbsorbScalarMulAddIntoTopK(),
    ]


def _float_ops(model: ModelWrapper) -> list[str]:
    """Names of the linear float ops (Mul/Add/Sub/Div) left between layers."""
    return [n.name for n in model.graph.node if n.op_type in ("Mul", "Add", "Sub", "Div")
            and not all(model.get_tensor_datatype(i).is_integer() for i in n.input)]


def _weight_layers(model: ModelWrapper):
    for n in model.graph.node:
        if is_fpgadataflow_node(n) and n.op_type.split("_")[0] in ("MVAU", "VVAU", "Thresholding"):
            yield n


@register_step
def step_runtime_writeable(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """Weights and thresholds in decoupled memories, writable at run time.

    VVAU (depthwise) layers are refused: finn-plus 1.6.1's ``MakePYNQDriver`` writes runtime-weight
    files only for MVAU and Thresholding layers, so a runtime-writable VVAU would silently keep the
    weights it was compiled with."""
    if not cfg.runtime_weights:
        # compiled-in thresholds must lie in their input's range for finn-plus's bit-width
        # minimization (e.g. the input layer's negative thresholds on unsigned pixels): clip them,
        # which changes no output (RoundAndClipThresholds, as the runtime path does per round)
        return model.transform(RoundAndClipThresholds())
    vvau = [n.name for n in _weight_layers(model) if n.op_type.startswith("VVAU")]
    if vvau:
        raise RuntimeWeightsUnsupported(
            f"{len(vvau)} depthwise (VVAU) layer(s) ({', '.join(vvau[:4])}) cannot be updated at run time: "
            "finn-plus 1.6.1's driver generator writes runtime-weight files only for MVAU and Thresholding "
            "layers, so their weights would never change after the first round. Build with "
            "--no-runtime-weights, or use a model without depthwise convolutions.")
    for n in _weight_layers(model):
        inst = getCustomOp(n)
        attrs = inst.get_nodeattr_types()
        if "mem_mode" in attrs:
            inst.set_nodeattr("mem_mode", "internal_decoupled")
        if "runtime_writeable_weights" in attrs:
            inst.set_nodeattr("runtime_writeable_weights", 1)
    return model


def _fold(model: ModelWrapper, cfg: HwBuildConfig, fps: float) -> tuple[ModelWrapper, dict]:
    """SetFolding for ``fps``, each matrix layer then at its cheapest PE x SIMD meeting the
    same cycles (hw/folding.py), + the bit-width minimization the build applies after it, for
    the estimate; if that does not fit, :func:`rebalance` the memories and multipliers."""
    cycles = max(1, int(1e9 / cfg.synth_clk_period_ns / fps))
    m = model.transform(SetFolding(cycles, mvau_wwidth_max=cfg.mvau_wwidth_max,
                                   two_pass_relaxation=cfg.folding_two_pass_relaxation))
    cap = cfg.board_info.capacity()
    cheapest_mvau_folding(m, cfg.fpga_part, cycles, cfg.mvau_wwidth_max,
                          {k: cfg.usable.get(k, 1.0) * cap[k] for k in _RES})
    m = m.transform(GiveUniqueNodeNamesRecursive())
    probe = build_dataflow_step_lookup["step_minimize_bit_width"](m, cfg)
    est = estimate(probe, cfg)
    if not est["fits"] and cfg.fit_to_board:
        layers = _layer_total(probe, cfg)  # what rebalancing can change; the rest stays as counted
        offset = {k: est["resources"][k] - layers[k] for k in _RES}
        moves = rebalance(probe, cfg, offset=offset)
        if moves:
            _apply_moves(m, moves)
            _apply_moves(probe, moves)
            est = estimate(probe, cfg)
            est["rebalanced"] = [f"{n}.{a}={v}" for n, a, v in moves]
    return m, est


#: Per-layer implementation choices the rebalancing may change.
REBALANCE_ATTRS = ("ram_style", "resType", "ram_style_thresholds")
_RES = ("LUT", "BRAM_18K", "DSP", "URAM")


def _score(total: dict, cfg: HwBuildConfig) -> tuple[float, float]:
    """(summed excess over the budget, largest budget ratio) - lower is better."""
    cap = cfg.board_info.capacity()
    ratios = []
    for k in _RES:
        lim = cfg.usable.get(k, 1.0) * cap[k]
        ratios.append(total.get(k, 0.0) / lim if lim > 0 else (math.inf if total.get(k, 0.0) > 0 else 0.0))
    return (sum(max(0.0, r - 1.0) for r in ratios), max(ratios))


def _layer_total(model: ModelWrapper, cfg: HwBuildConfig) -> dict:
    nodes = [n for n in model.graph.node if is_hls_node(n) or is_rtl_node(n)]
    res = [getHWCustomOp(n).node_res_estimation(cfg.fpga_part) for n in nodes]
    return {k: sum(float(r.get(k, 0)) for r in res) for k in _RES}


def rebalance(model: ModelWrapper, cfg: HwBuildConfig, max_moves: int = 60,
              offset: dict | None = None) -> list[tuple[str, str, str]]:
    """Greedy trade between LUTs, BRAM, DSPs and URAM for a folding that does not fit.

    FINN chooses each layer's memory (``ram_style``: block / distributed /
    ultra) and multiplier (``resType``: lut / dsp) on its own; with a budget,
    a BRAM-bound design can move small weight memories to LUTRAM, a LUT-bound
    one MACs to idle DSPs, and so on. Each move is the single change of one
    layer attribute that most reduces the excess over the budget (estimates
    from finn-plus's per-layer res_estimation; ``offset`` is the rest of the
    budget - width converters, FIFOs, DMAs, shell - which the moves do not
    change). Returns the moves ``(layer, attribute, value)``; ``model`` is
    left unchanged.
    """
    part = cfg.fpga_part
    model = ModelWrapper(copy.deepcopy(model.model))  # work on a copy
    nodes = [n for n in model.graph.node if is_hls_node(n) or is_rtl_node(n)]
    insts = {n.name: getHWCustomOp(n) for n in nodes}
    cur = {name: inst.node_res_estimation(part) for name, inst in insts.items()}
    total = {k: sum(float(r.get(k, 0)) for r in cur.values()) + (offset or {}).get(k, 0.0) for k in _RES}
    state = {name: {a: inst.get_nodeattr(a) for a in REBALANCE_ATTRS if a in inst.get_nodeattr_types()}
             for name, inst in insts.items()}

    def alternatives(name):
        inst = insts[name]
        types = inst.get_nodeattr_types()
        out = []
        for a, v0 in state[name].items():
            allowed = types[a][3] if len(types[a]) > 3 and types[a][3] else ()
            for v in allowed:
                if v == v0 or v == "auto":
                    continue
                inst.set_nodeattr(a, v)
                try:
                    r = inst.node_res_estimation(part)
                    out.append((a, v, r))
                except Exception:
                    pass
                finally:
                    inst.set_nodeattr(a, v0)
        return out

    alts = {name: alternatives(name) for name in insts}
    moves = []
    score = _score(total, cfg)
    for _ in range(max_moves):
        if score[0] == 0.0:
            break
        best = None
        for name, lst in alts.items():
            for a, v, r in lst:
                t2 = {k: total[k] - float(cur[name].get(k, 0)) + float(r.get(k, 0)) for k in _RES}
                sc = _score(t2, cfg)
                if sc < score and (best is None or sc < best[0]):
                    best = (sc, name, a, v, r, t2)
        if best is None:
            break
        score, name, a, v, r, total = best
        insts[name].set_nodeattr(a, v)
        state[name][a] = v
        cur[name] = r
        alts[name] = alternatives(name)
        moves.append((name, a, v))
    return moves if score[0] == 0.0 else []


def _apply_moves(model: ModelWrapper, moves) -> None:
    for name, a, v in moves:
        getHWCustomOp(model.get_node_from_name(name)).set_nodeattr(a, v)


@register_step
def step_fold_to_budget(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """Folding (PE/SIMD) from a target FPS, limited by the board's resource budget.

    * folding_config_file given: nothing here (step_apply_folding_config applies it).
    * fit_to_board=False: FINN's SetFolding for target_fps, as step_target_fps_parallelization.
    * else: the fastest folding whose estimate fits: bisection (in log space) on
      the target between 1 image/s and ``target_fps`` / ``max_target_fps`` /
      the fully parallel design.
    """
    report_dir = cfg.get_report_directory()
    if cfg.folding_config_file is not None:
        return model
    if not cfg.fit_to_board:
        m, est = _fold(model, cfg, cfg.target_fps)
        search = [{"target_fps": cfg.target_fps, **_brief(est)}]
    else:
        search = []
        hi = cfg.target_fps or cfg.max_target_fps or 1e12
        m, est = _fold(model, cfg, hi)
        search.append({"target_fps": hi, **_brief(est)})
        hi = min(hi, est["fps"] * 1.0001)  # the fastest reachable
        if not est["fits"]:
            best = None
            lo = 1.0
            m_lo, est_lo = _fold(model, cfg, lo)
            search.append({"target_fps": lo, **_brief(est_lo)})
            if est_lo["fits"]:
                best = (m_lo, est_lo)
                lo = max(lo, est_lo["fps"])
                for _ in range(16):
                    if hi / lo < 1.005:
                        break
                    mid = math.sqrt(lo * hi)
                    m_mid, est_mid = _fold(model, cfg, mid)
                    search.append({"target_fps": round(mid, 1), **_brief(est_mid)})
                    if est_mid["fits"]:
                        if est_mid["fps"] >= best[1]["fps"]:
                            best = (m_mid, est_mid)
                        lo = max(mid, est_mid["fps"])
                    else:
                        hi = mid
                m, est = best
            else:
                m, est = m_lo, est_lo  # does not fit even fully folded; report says so
    hw_attrs = ["PE", "SIMD", "parallel_window", "ram_style", "ram_style_thresholds", "resType",
                "mem_mode", "runtime_writeable_weights"]
    extract_model_config_to_json(m, report_dir / "auto_folding_config.json", hw_attrs)
    (report_dir / "folding_search.json").write_text(json.dumps(search, indent=2))
    return m


def _brief(est: dict) -> dict:
    return {"fps": round(est["fps"], 1), "fits": est["fits"], "rebalanced": len(est.get("rebalanced", [])),
            "utilization": {k: round(v, 4) for k, v in est["utilization"].items()}}


@register_step
def step_pynq_driver(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """PYNQ driver settings + runtime-weight files, without Vivado.

    Applies the bitstream flow's model preparation (:func:`bitstream_graph`, then ``ZynqBuild``'s
    floorplan and partitions) to a copy of the model, then finn-plus's MakePYNQDriver. The
    returned model is unchanged."""
    drv = make_driver_files(model, cfg, cfg.get_driver_directory())
    log.info("driver written to %s", drv)
    return model


def driver_parent(model: ModelWrapper, cfg: HwBuildConfig, part_dir: Path) -> ModelWrapper:
    """The partitioned model the driver is generated from, with the DMA instance names
    ``MakeZYNQProject`` gives (the driver looks the DMAs up by name)."""
    m = bitstream_graph(model, cfg.fpga_part, cfg.board_info.axi_port_width)
    if part_dir.exists():
        shutil.rmtree(part_dir)
    for t in (Floorplan(), CreateDataflowPartition(partition_model_dir=str(part_dir))):
        m = m.transform(t)
        m = m.transform(GiveUniqueNodeNames())
        m = m.transform(GiveReadableTensorNames())
    idma = odma = 0
    for sdp in m.get_nodes_by_op_type("StreamingDataflowPartition"):
        if m.find_producer(sdp.input[0]) is None:
            name, idma = f"idma{idma}", idma + 1
        elif not m.find_consumers(sdp.output[0]):
            name, odma = f"odma{odma}", odma + 1
        else:
            name = sdp.name
        getCustomOp(sdp).set_nodeattr("instance_name", name)
    return m


def make_driver_files(model: ModelWrapper, cfg: HwBuildConfig, out_dir: Path) -> Path:
    part_dir = cfg.get_intermediate_models_directory() / "driver_partitions"
    m = driver_parent(model, cfg, part_dir)
    m.save(str(part_dir / "driver_parent.onnx"))
    with fast_packing():  # finn's weight-file writer, with the vectorized packer (hw/packing.py)
        m = m.transform(MakePYNQDriver("zynq-iodma", "FINNDMAOverlay", clk_period_ns=cfg.synth_clk_period_ns,
                                       validation_datset=None, board=cfg.board))
    src = Path(m.get_metadata_prop("pynq_driver_dir"))
    out_dir = Path(out_dir)
    if (out_dir / "runtime_weights").exists():
        shutil.rmtree(out_dir / "runtime_weights")
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    if (out_dir / "runtime_weights").is_dir():
        write_layout(m, out_dir / "runtime_weights")  # where each weight sits in the words (hw/datfiles.py)
    return out_dir


@register_step
def step_record_weights_recipe(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """How each runtime-writable tensor derives from the QONNX model's parameters (hw/recipe.py):
    recorded once here, replayed by ``hw weights`` for every later round."""
    if not cfg.runtime_weights:
        return model
    record_for_build(cfg, model, front_half)
    return model


@register_step
def step_report(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    write_report(cfg, model)
    return model
