"""Export of the global models: PyTorch/Brevitas -> QONNX -> FINN-ONNX, with parity checks.

* ``to_qonnx(model, path)`` (qonnx_export), ``to_finn_onnx(qonnx_path, out_path)`` (finn_export)
* ``export_round(model, run_dir, server_round, model_name=...)`` (run_export): the server's hook
* ``export_run(run_dir, round=None, finn=True)``: ``fedfinn export RUN [--round N]`` (cli)
* ``parity(model, graph_path, x, kind)`` (parity)

finn (finn-plus) is imported only when a FINN conversion or execution is asked for.
"""

from .finn_export import FinnUnavailableError, finn_available, to_finn_onnx
from .parity import Parity, parity
from .qonnx_export import NotDeployableError, finn_blockers, to_qonnx
from .run_export import ExportResult, export_round, export_run, round_paths

__all__ = [
    "ExportResult", "FinnUnavailableError", "NotDeployableError", "Parity", "export_round", "export_run",
    "finn_available", "finn_blockers", "parity", "round_paths", "to_finn_onnx", "to_qonnx",
]
