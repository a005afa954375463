"""Export of the global models: PyTorch/Brevitas -> QONNX -> FINN-ONNX, with parity checks.

* ``to_qonnx(model, path)`` (qonnx_export), ``to_finn_onnx(qonnx_path, out_path)`` (finn_export)
* ``export_round(model, run_dir, server_round, model_name=...)`` (run_export): one round's files
* ``parity(model, graph_path, x, kind)`` (parity)
* finn-plus's environment and availability (finn_env): the one place the project prepares FINN

Layer: imports ``training.models`` only; finn (finn-plus) is imported only when a FINN conversion
or execution is asked for.
"""

import importlib

# Names resolved on first use (PEP 562): ``import export.finn_env`` (what hw/ and every FINN step
# import first) must not import torch and brevitas through the other submodules - it cost the
# per-round ``hw weights`` command seconds of imports it does not use.
_WHERE = {
    "finn_available": "finn_env", "finn_missing": "finn_env",
    "FinnUnavailableError": "finn_export", "to_finn_onnx": "finn_export",
    "Parity": "parity", "parity": "parity",
    "NotDeployableError": "qonnx_export", "finn_blockers": "qonnx_export", "to_qonnx": "qonnx_export",
    "ExportResult": "run_export", "export_round": "run_export", "round_paths": "run_export",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportResult", "FinnUnavailableError", "NotDeployableError", "Parity", "export_round", "finn_available",
    "finn_blockers", "finn_missing", "parity", "round_paths", "to_finn_onnx", "to_qonnx",
]
