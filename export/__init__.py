"""Export of the global models: PyTorch/Brevitas -> QONNX -> FINN-ONNX, with parity checks.

* ``to_qonnx(model, path)`` (qonnx_export), ``to_finn_onnx(qonnx_path, out_path)`` (finn_export)
* ``export_round(model, run_dir, server_round, model_name=...)`` (run_export): one round's files
* ``parity(model, graph_path, x, kind)`` (parity)
* finn-plus's environment and availability (finn_env): the one place the project prepares FINN

Layer: imports ``training.models`` only; finn (finn-plus) is imported only when a FINN conversion
or execution is asked for.
"""

from .finn_env import finn_available, finn_missing
from .finn_export import FinnUnavailableError, to_finn_onnx
from .parity import Parity, parity
from .qonnx_export import NotDeployableError, finn_blockers, to_qonnx
from .run_export import ExportResult, export_round, round_paths

__all__ = [
    "ExportResult", "FinnUnavailableError", "NotDeployableError", "Parity", "export_round", "finn_available",
    "finn_blockers", "finn_missing", "parity", "round_paths", "to_finn_onnx", "to_qonnx",
]
