"""The FINN flow: a build configuration plus a list of named steps.

Like FINN's own builder (``finn.builder.build_dataflow``): :class:`HwBuildConfig`
*is* a FINN ``DataflowBuildConfig`` (a subclass with a few fields of ours), a
build is a list of step names, each step is a function ``(model, cfg) ->
model``, and every step leaves its model in
``<output_dir>/intermediate/NN_<step>.onnx``. Steps named ``step_*`` that are
not defined here are finn-plus's own (``build_dataflow_step_lookup``).

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
  (bisection on the target) for the fastest folding whose estimated resources
  fit the board's budget (:data:`hw.boards.USABLE` of its capacity).
* ``step_pynq_driver`` - the PYNQ driver's ``settings.json`` and the
  ``runtime_weights/*.dat`` files, made by finn-plus's ``MakePYNQDriver`` on
  the model prepared exactly as ``ZynqBuild`` prepares it (IODMAs, width
  converters, floorplan, partitions) - no Vivado needed.
* ``step_report`` - ``report/hw_report.json`` and ``report/hw_report.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from export.finn_env import prepare, use_finn_build_dir

prepare()  # FINN_BUILD_DIR, settings and the no-Vivado work-around, before finn.builder

from finn.builder.build_dataflow_config import (  # noqa: E402
    AutoFIFOSizingMethod,
    DataflowBuildConfig,
    DataflowOutputType,
    ShellFlowType,
)
from finn.builder.build_dataflow_steps import build_dataflow_step_lookup  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.transformation.insert_topk import InsertTopK  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402
from finn.transformation.streamline import Streamline  # noqa: E402
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
from finn.transformation.fpgadataflow.insert_dwc import InsertDWC  # noqa: E402
from finn.transformation.fpgadataflow.insert_iodma import InsertIODMA  # noqa: E402
from finn.transformation.fpgadataflow.make_driver import MakePYNQDriver  # noqa: E402
from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers  # noqa: E402

from .boards import USABLE, Board, get_board  # noqa: E402
from .datfiles import write_layout  # noqa: E402
from .estimate import estimate  # noqa: E402
from .report import write_report  # noqa: E402
from .transforms import MergeIdenticalTransposes, ReduceMeanToGlobalAccPool  # noqa: E402

log = logging.getLogger("fedfinn.hw")

#: The steps of ``make hw`` (everything that runs without Vivado).
HW_STEPS = [
    "step_preprocess_io",
    "step_qonnx_to_finn",
    "step_tidy_up",
    "step_streamline_residual",
    "step_convert_to_hw",
    "step_runtime_writeable",
    "step_minimize_bit_width_initial",
    "step_create_dataflow_partition",
    "step_specialize_layers",
    "step_fold_to_budget",
    "step_apply_folding_config",
    "step_minimize_bit_width",
    "step_generate_estimate_reports",
    "step_hw_codegen",
    "step_pynq_driver",
    "step_report",
]
#: The step whose model is the final folded dataflow model (emulation, weights).
FINAL_STEP = "step_generate_estimate_reports"

#: The steps of ``make bitstream`` (need Vivado + Vitis HLS), run on the model
#: FINAL_STEP left. All finn-plus's own.
BITSTREAM_STEPS = [
    "step_generate_hardware",  # HLS/RTL code, HLS IP synthesis, FIFO sizing
    "step_create_stitched_ip",
    "step_synthesize_bitfile",  # ZynqBuild: IODMAs, block design, bitfile + hwh
    "step_make_driver",
    "step_deployment_package",
]


@dataclass
class HwBuildConfig(DataflowBuildConfig):
    """finn-plus's DataflowBuildConfig plus the fields of fedfinn's steps."""

    #: Name of the build (folder name under build/).
    name: str = "model"
    #: Data set the model was trained on, and its per-channel mean/std on a 0..1 scale
    #: (``step_preprocess_io`` prepends that normalization; the caller passes them in).
    dataset: str = "cifar10"
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    #: Prepend the raw-image input (UINT8 NHWC) and append TopK(1).
    preprocess_io: bool = True
    #: Make weights and thresholds runtime-writable (compile once).
    runtime_weights: bool = True
    #: Search the fastest folding that fits the board (else: plain target_fps).
    fit_to_board: bool = True
    #: Upper bound of the folding search [images/s]; None: the fastest possible.
    max_target_fps: Optional[int] = None
    #: Fractions of the board's capacity the accelerator may use.
    usable: dict[str, float] = field(default_factory=lambda: dict(USABLE))
    #: Wall time per step [s], filled by :func:`run_steps`.
    step_times: dict[str, float] = field(default_factory=dict)

    # Builds land in build/<name>/intermediate (FINN: intermediate_models).
    def get_intermediate_models_directory(self, create: bool = True) -> Path:
        d = Path(self.output_dir) / "intermediate"
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def board_info(self) -> Board:
        return get_board(self.board)

    @property
    def clock_mhz(self) -> float:
        return 1000.0 / self.synth_clk_period_ns

    def input_stats(self) -> tuple[list[float], list[float]]:
        if self.mean is None or self.std is None:
            raise ValueError(f"the build needs the input normalization of {self.dataset!r}: pass mean and std "
                             "(training.data.dataset_stats)")
        return list(self.mean), list(self.std)

    def record(self) -> dict:
        """The fields a later step / weights update needs, as plain JSON."""
        keys = [
            "name", "board", "fpga_part", "synth_clk_period_ns", "target_fps", "mvau_wwidth_max",
            "folding_two_pass_relaxation", "standalone_thresholds", "minimize_bit_width",
            "dataset", "mean", "std", "preprocess_io", "runtime_weights", "fit_to_board",
            "max_target_fps", "usable", "folding_config_file", "model_path", "output_dir",
        ]
        out = {}
        for k in keys:
            v = getattr(self, k)
            out[k] = str(v) if isinstance(v, Path) else v
        return out


def make_config(
    model: str | Path,
    board: str = "Pynq-Z2",
    output_dir: str | Path | None = None,
    name: str | None = None,
    target_fps: int | None = None,
    clock_mhz: float | None = None,
    folding_config: str | Path | None = None,
    **kw: Any,
) -> HwBuildConfig:
    """A build configuration for ``model`` on ``board`` with fedfinn's defaults."""
    b = get_board(board)
    name = name or Path(model).stem
    output_dir = Path(output_dir or Path("build") / name)
    clock = clock_mhz or b.clock_mhz
    cfg = HwBuildConfig(
        name=name,
        model_path=Path(model).absolute(),
        output_dir=str(output_dir.absolute()),
        board=b.name,
        fpga_part=b.part,
        shell_flow_type=ShellFlowType.VIVADO_ZYNQ,
        synth_clk_period_ns=1000.0 / clock,
        target_fps=target_fps,
        folding_config_file=Path(folding_config).absolute() if folding_config else None,
        # Thresholds as layers of their own: the only way to make them runtime-writable.
        standalone_thresholds=True,
        # Weight streams may be wide: the board budget, not a fixed width, limits SIMD.
        mvau_wwidth_max=kw.pop("mvau_wwidth_max", 1024),
        generate_outputs=[
            DataflowOutputType.ESTIMATE_REPORTS,
            DataflowOutputType.PYNQ_DRIVER,
            DataflowOutputType.BITFILE,
            DataflowOutputType.DEPLOYMENT_PACKAGE,
        ],
        # FIFO sizing by FINN's simulation (needs Vivado's xsim; bitstream steps only).
        auto_fifo_depths=True,
        auto_fifo_strategy=AutoFIFOSizingMethod.DISTRIBUTED_SIMULATION,
        steps=list(HW_STEPS),
        save_intermediate_models=True,
        **kw,
    )
    if cfg.target_fps is None and not cfg.fit_to_board and cfg.folding_config_file is None:
        raise ValueError("give target_fps, a folding config, or fit_to_board=True")
    return cfg


# --------------------------------------------------------------------------
# step registry and runner
# --------------------------------------------------------------------------

STEPS: dict[str, Callable[[ModelWrapper, HwBuildConfig], ModelWrapper]] = {}


def register(fn):
    STEPS[fn.__name__] = fn
    return fn


def resolve_step(name: str):
    if name in STEPS:
        return STEPS[name]
    if name in build_dataflow_step_lookup:
        return build_dataflow_step_lookup[name]
    raise KeyError(f"unknown step {name!r}; fedfinn steps: {', '.join(STEPS)}; finn steps: "
                   f"{', '.join(build_dataflow_step_lookup)}")


def intermediate_path(cfg: HwBuildConfig, index: int, step: str) -> Path:
    return cfg.get_intermediate_models_directory() / f"{index:02d}_{step}.onnx"


def find_intermediate(output_dir: str | Path, step: str) -> Path:
    hits = sorted((Path(output_dir) / "intermediate").glob(f"[0-9][0-9]_{step}.onnx"))
    if not hits:
        raise FileNotFoundError(f"no intermediate model of {step} in {output_dir}/intermediate (run `make hw` first)")
    return hits[-1]


def run_steps(
    cfg: HwBuildConfig,
    steps: list[str] | None = None,
    model: ModelWrapper | None = None,
    first_index: int = 1,
    echo: Callable[[str], None] | None = print,
    record: str | None = "build_config.json",
) -> ModelWrapper:
    """Run ``steps`` (default ``cfg.steps``) in order; save NN_<step>.onnx after each."""
    steps = list(steps or cfg.steps or HW_STEPS)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = ModelWrapper(str(cfg.model_path))
    use_finn_build_dir(out / "finn_tmp")  # generated code stays inside the build folder
    t_total = time.time()
    for i, name in enumerate(steps):
        fn = resolve_step(name)
        t0 = time.time()
        if echo:
            echo(f"[hw] {first_index + i:02d} {name} ...")
        model = fn(model, cfg)
        dt = time.time() - t0
        cfg.step_times[name] = round(dt, 3)
        if cfg.save_intermediate_models and name != "step_report":
            model.save(str(intermediate_path(cfg, first_index + i, name)))
        if echo:
            echo(f"[hw] {first_index + i:02d} {name} done in {dt:.1f} s")
    cfg.step_times["total" if first_index == 1 else f"total_from_{steps[0]}"] = round(time.time() - t_total, 3)
    if record:
        (out / record).write_text(json.dumps({**cfg.record(), "steps": steps, "step_times": cfg.step_times},
                                             indent=2))
    return model


def build(cfg: HwBuildConfig, echo=print) -> dict:
    """``make hw``: run all steps; return the report dict."""
    t0 = time.time()
    run_steps(cfg, echo=echo)
    report_path = Path(cfg.output_dir) / "report" / "hw_report.json"
    rep = json.loads(report_path.read_text())
    rep["build_seconds"] = round(time.time() - t0, 2)
    report_path.write_text(json.dumps(rep, indent=2))
    return rep


# --------------------------------------------------------------------------
# steps written here
# --------------------------------------------------------------------------


@register
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


@register
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


@register
def step_runtime_writeable(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """Weights and thresholds in decoupled memories, writable at run time."""
    if not cfg.runtime_weights:
        return model
    for n in _weight_layers(model):
        inst = getCustomOp(n)
        attrs = inst.get_nodeattr_types()
        if "mem_mode" in attrs:
            inst.set_nodeattr("mem_mode", "internal_decoupled")
        if "runtime_writeable_weights" in attrs:
            inst.set_nodeattr("runtime_writeable_weights", 1)
    return model


def _fold(model: ModelWrapper, cfg: HwBuildConfig, fps: float) -> tuple[ModelWrapper, dict]:
    """SetFolding for ``fps`` (+ the bit-width minimization the build applies after
    it, for the estimate); if that does not fit, :func:`rebalance` the memories
    and multipliers."""
    cycles = max(1, int(1e9 / cfg.synth_clk_period_ns / fps))
    m = model.transform(SetFolding(cycles, mvau_wwidth_max=cfg.mvau_wwidth_max,
                                   two_pass_relaxation=cfg.folding_two_pass_relaxation))
    m = m.transform(GiveUniqueNodeNamesRecursive())
    probe = build_dataflow_step_lookup["step_minimize_bit_width"](m, cfg)
    est = estimate(probe, cfg)
    if not est["fits"] and cfg.fit_to_board:
        moves = rebalance(probe, cfg)
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


def rebalance(model: ModelWrapper, cfg: HwBuildConfig, max_moves: int = 60) -> list[tuple[str, str, str]]:
    """Greedy trade between LUTs, BRAM, DSPs and URAM for a folding that does not fit.

    FINN chooses each layer's memory (``ram_style``: block / distributed /
    ultra) and multiplier (``resType``: lut / dsp) on its own; with a budget,
    a BRAM-bound design can move small weight memories to LUTRAM, a LUT-bound
    one MACs to idle DSPs, and so on. Each move is the single change of one
    layer attribute that most reduces the excess over the budget (estimates
    from finn-plus's per-layer res_estimation). Returns the moves
    ``(layer, attribute, value)``; ``model`` is left unchanged.
    """
    part = cfg.fpga_part
    model = ModelWrapper(copy.deepcopy(model.model))  # work on a copy
    nodes = [n for n in model.graph.node if is_hls_node(n) or is_rtl_node(n)]
    insts = {n.name: getHWCustomOp(n) for n in nodes}
    cur = {name: inst.node_res_estimation(part) for name, inst in insts.items()}
    total = {k: sum(float(r.get(k, 0)) for r in cur.values()) for k in _RES}
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


@register
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
                for _ in range(12):
                    if hi / lo < 1.03:
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


@register
def step_pynq_driver(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    """PYNQ driver settings + runtime-weight files, without Vivado.

    Applies ZynqBuild's model preparation (InsertIODMA, InsertDWC,
    SpecializeLayers, Floorplan, CreateDataflowPartition) to a copy of the
    model, then finn-plus's MakePYNQDriver. The returned model is unchanged.
    """
    drv = make_driver_files(model, cfg, cfg.get_driver_directory())
    log.info("driver written to %s", drv)
    return model


def make_driver_files(model: ModelWrapper, cfg: HwBuildConfig, out_dir: Path) -> Path:
    board = cfg.board_info
    m = model.transform(InferDataLayouts())
    part_dir = cfg.get_intermediate_models_directory() / "driver_partitions"
    if part_dir.exists():
        shutil.rmtree(part_dir)
    for t in (InsertIODMA(board.axi_port_width), InsertDWC(), SpecializeLayers(board.part), Floorplan(),
              CreateDataflowPartition(partition_model_dir=str(part_dir))):
        m = m.transform(t)
        m = m.transform(GiveUniqueNodeNames())
        m = m.transform(GiveReadableTensorNames())
    # instance names as MakeZYNQProject gives them (the driver looks the DMAs up by name)
    idma = odma = 0
    for sdp in m.get_nodes_by_op_type("StreamingDataflowPartition"):
        if m.find_producer(sdp.input[0]) is None:
            name, idma = f"idma{idma}", idma + 1
        elif not m.find_consumers(sdp.output[0]):
            name, odma = f"odma{odma}", odma + 1
        else:
            name = sdp.name
        getCustomOp(sdp).set_nodeattr("instance_name", name)
    m.save(str(part_dir / "driver_parent.onnx"))
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


@register
def step_report(model: ModelWrapper, cfg: HwBuildConfig) -> ModelWrapper:
    write_report(cfg, model)
    return model
