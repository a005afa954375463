"""The build configuration and the names of a build's steps and files (no finn builder import).

:class:`HwBuildConfig` is finn-plus's ``DataflowBuildConfig`` plus the fields of fedfinn's steps,
saved with the config's own ``to_json`` as ``build_config.json`` and read back with ``from_json``.
Kept apart from hw/build.py (the steps and finn-plus's runner) so that ``hw weights``'s per-round
path does not import finn-plus's builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from export.finn_env import prepare

prepare()

from finn.builder.build_dataflow_config import (  # noqa: E402
    AutoFIFOSizingMethod,
    DataflowBuildConfig,
    DataflowOutputType,
    ShellFlowType,
)
from finn.util.exception import FINNUserError  # noqa: E402

from .boards import USABLE, Board, get_board  # noqa: E402

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
    "step_record_weights_recipe",
    "step_report",
]
#: The step whose model is the final folded dataflow model (emulation, weights).
FINAL_STEP = "step_generate_estimate_reports"
#: The last step of the flow's front half: what ``hw weights`` re-runs on a round's model when it
#: cannot use the recorded recipe (hw/recipe.py), and what the recipe is recorded through.
FRONT_STOP_STEP = "step_specialize_layers"

#: The steps of ``make bitstream`` (need Vivado + Vitis HLS), run on the model
#: FINAL_STEP left. All finn-plus's own.
BITSTREAM_STEPS = [
    "step_generate_hardware",  # HLS/RTL code, HLS IP synthesis, FIFO sizing
    "step_create_stitched_ip",
    "step_synthesize_bitfile",  # ZynqBuild: IODMAs, block design, bitfile + hwh
    "step_make_driver",
    "step_deployment_package",
]

#: finn-plus's default weight-stream width per PE (DataflowBuildConfig.mvau_wwidth_max): SetFolding
#: stops growing a layer's SIMD before SIMD x weight bits exceeds it.
WEIGHT_STREAM_CAP_BITS = 36


class HwBuildError(RuntimeError):
    """A build step failed (the message names the step and the log)."""


class RuntimeWeightsUnsupported(FINNUserError):
    """A layer cannot be made runtime-writable (its weight files would never be written)."""


@dataclass
class HwBuildConfig(DataflowBuildConfig):
    """finn-plus's DataflowBuildConfig plus the fields of fedfinn's steps.

    Serialized with the config's own ``to_json`` / ``from_json`` (``build_config.json``)."""

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
    #: Fractions of the board's capacity the whole design (accelerator, DMAs, shell) may use.
    usable: dict[str, float] = field(default_factory=lambda: dict(USABLE))
    #: Size residual-shortcut FIFOs from the branches' latencies in the budget (hw/budget.py).
    branch_fifos: bool = True

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
        # Weight-stream width per PE: finn-plus's default cap. Wider streams waste BRAM (shallow
        # memories), need wide width converters and wide AXI-lite adapters (hw/budget.py).
        mvau_wwidth_max=kw.pop("mvau_wwidth_max", WEIGHT_STREAM_CAP_BITS),
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


def save_config(cfg: HwBuildConfig, path: str | Path | None = None) -> Path:
    """``build_config.json`` (the config's own ``to_json``) - what later commands load."""
    path = Path(path or Path(cfg.output_dir) / "build_config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_json())
    return path


def load_config(build_dir: str | Path) -> HwBuildConfig:
    """The configuration a finished ``make hw`` build saved (``HwBuildConfig.from_json``)."""
    p = Path(build_dir) / "build_config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: {build_dir} is not a finished `make hw` build")
    try:
        return HwBuildConfig.from_json(p.read_text())
    except Exception as e:  # noqa: BLE001 - e.g. a build folder of an older fedfinn
        raise ValueError(f"{p} is not a build configuration of this fedfinn ({type(e).__name__}: {e}); "
                         "rebuild with `make hw`") from e


def intermediate_path(cfg: HwBuildConfig, step: str) -> Path:
    return cfg.get_intermediate_models_directory() / f"{step}.onnx"


def find_intermediate(output_dir: str | Path, step: str) -> Path:
    """The model finn-plus's runner saved after ``step`` (``intermediate_models/<step>.onnx``)."""
    p = Path(output_dir) / "intermediate_models" / f"{step}.onnx"
    if not p.exists():
        raise FileNotFoundError(f"no intermediate model of {step} in {p.parent} (run `make hw` first)")
    return p


