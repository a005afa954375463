"""Export the global model of a round: ``runs/<name>/qonnx/round_NNN.onnx`` and ``finn/round_NNN.onnx``.

``export_round(model, run_dir, server_round, model_name=...)`` is what the
server's export observer (fedfinn.rounds) calls every k rounds with its global
model, and what ``fedfinn export RUN`` calls with a checkpoint's model
(fedfinn.export_commands).

Deployable models (``cnv-wXaY``, ``resnet12-bn-wXaY``) get both files. The
study model (``resnet12``) exports to QONNX; asking for its FINN conversion
raises ``NotDeployableError`` (after the QONNX file is written) with the
reasons and the model to use instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.models import is_deployable

from .finn_env import finn_missing
from .finn_export import to_finn_onnx
from .parity import Parity, parity, torch_logits
from .qonnx_export import NotDeployableError, finn_blockers, not_deployable_message, to_qonnx

@dataclass
class ExportResult:
    round: int
    qonnx_path: Path
    finn_path: Path | None = None
    qonnx_seconds: float = 0.0
    finn_seconds: float = 0.0
    parity: list[Parity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.qonnx_seconds + self.finn_seconds

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.parity)

    def summary(self) -> dict:
        """Flat, JSON-ready figures (e.g. for the round's metrics line)."""
        out = {"export_round": self.round, "export_qonnx": str(self.qonnx_path),
               "export_qonnx_seconds": round(self.qonnx_seconds, 3)}
        if self.finn_path is not None:
            out |= {"export_finn": str(self.finn_path), "export_finn_seconds": round(self.finn_seconds, 3)}
        for p in self.parity:
            out |= {f"parity_{p.kind}_max_abs_diff": p.max_abs_diff, f"parity_{p.kind}_top1": p.top1_agreement}
        return out

    def lines(self) -> list[str]:
        out = [f"round {self.round}: QONNX  {self.qonnx_path} ({self.qonnx_seconds:.2f} s)"]
        if self.finn_path is not None:
            out.append(f"round {self.round}: FINN-ONNX {self.finn_path} ({self.finn_seconds:.2f} s)")
        out += [p.line() for p in self.parity]
        out += [f"round {self.round}: note: {n}" for n in self.notes]
        return out


def round_paths(run_dir: str | Path, server_round: int) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    name = f"round_{server_round:03d}.onnx"
    return run_dir / "qonnx" / name, run_dir / "finn" / name


def export_round(
    model: nn.Module,
    run_dir: str | Path,
    server_round: int,
    *,
    model_name: str | None = None,
    finn: bool | None = None,
    check_images: torch.Tensor | None = None,
    dynamo: bool = False,
) -> ExportResult:
    """Write round ``server_round``'s QONNX (and FINN-ONNX) files under ``run_dir``.

    ``finn``: None = convert when the model is deployable (``model_name`` via
    ``training.models.is_deployable``, else judged from the graph) and finn is
    installed, else skip with a note (never fails a training run); True =
    convert or raise ``NotDeployableError`` / ``FinnUnavailableError``;
    False = QONNX only.
    ``check_images``: normalized NCHW images to check parity on (None: no check).
    The model is not modified (exported in eval mode, its mode restored).
    """
    qonnx_path, finn_path = round_paths(run_dir, server_round)
    t0 = time.perf_counter()
    wrapper = to_qonnx(model, qonnx_path, input_shape=(1, 3, 32, 32), dynamo=dynamo)
    result = ExportResult(server_round, qonnx_path, qonnx_seconds=time.perf_counter() - t0)
    what = f"model {model_name!r}" if model_name else "this model"
    if finn is None or finn:
        deployable = _deployable(model_name)
        reasons = finn_blockers(wrapper)
        if deployable is False and not reasons:
            reasons = ["it is not one of the deployable models"]
        if reasons:
            if finn:
                raise NotDeployableError(not_deployable_message(what, reasons) + f" (QONNX written: {qonnx_path})")
            result.notes.append(f"no FINN-ONNX: {what} is not deployable")
        elif finn is None and finn_missing() is not None:
            result.notes.append(f"no FINN-ONNX: {finn_missing()}")
        else:
            t1 = time.perf_counter()
            to_finn_onnx(qonnx_path, finn_path, what=what)
            result.finn_path, result.finn_seconds = finn_path, time.perf_counter() - t1
    if check_images is not None and len(check_images):
        reference = torch_logits(model, check_images)
        result.parity.append(parity(model, qonnx_path, check_images, "qonnx", reference))
        if result.finn_path is not None:
            result.parity.append(parity(model, finn_path, check_images, "finn", reference))
    return result


def _deployable(model_name: str | None) -> bool | None:
    return None if model_name is None else is_deployable(model_name)
