"""Environment for finn-plus (FINN) — the ONE place for its set-up and work-arounds.

It lives in export/ because the FINN-ONNX conversion is where the project first
imports finn; hw/ builds on it. Call :func:`prepare` before importing anything
from ``finn``. It

* sets ``FINN_BUILD_DIR`` (FINN's scratch folder for generated code) and
  ``FINN_SETTINGS`` (so finn-plus does not create ``~/.finn/``);
* when no real Vivado is installed, applies the two work-arounds below so that
  every step before IP generation runs (estimates, HLS/RTL code generation,
  PYNQ driver, runtime-weight files);
* reports whether a real Vivado (and its version) is present.

Work-arounds (only applied without a real Vivado; remove when finn-plus
imports its builder without Vivado by itself):

1. ``finn.builder.build_dataflow_steps`` does ``from finn.xsi import SimEngine``
   at import time; ``finn.xsi`` resolves that name lazily and raises
   ``OSError: XILINX_VIVADO environment variable not set`` without Vivado.
   Binding ``finn.xsi.SimEngine = None`` first makes the import a plain
   attribute lookup. RTL simulation is never used without Vivado anyway.
2. finn-plus parses the Vivado version out of ``XILINX_VIVADO`` in a few
   places that also run in estimate-only builds; a placeholder path ending in
   a version (``.../no-vivado/Vivado/2024.2``, a folder that does not exist)
   satisfies that. :func:`vivado_info` never mistakes it for a real Vivado.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

#: Vivado release FINN is run against here (finn-plus 1.6.1 targets 2024.2).
PLACEHOLDER_VIVADO_VERSION = "2024.2"
_PLACEHOLDER_MARK = "no-vivado"  # path component that marks our placeholder

DEFAULT_BUILD_DIR = Path(os.environ.get("FEDFINN_FINN_TMP", "/tmp/fedfinn-finn"))


@dataclass
class VivadoInfo:
    present: bool  # a real Vivado install was found
    version: str | None  # e.g. "2024.2"
    path: str | None  # XILINX_VIVADO or the folder of `vivado` on PATH
    vitis_hls: bool  # vitis_hls / vitis-run on PATH (HLS IP generation)
    missing: list[str]  # human-readable list of what is missing

    def as_dict(self) -> dict:
        return asdict(self)


def _is_placeholder(path: str | None) -> bool:
    return bool(path) and _PLACEHOLDER_MARK in Path(path).parts


def vivado_info() -> VivadoInfo:
    """Look for a real Vivado: ``$XILINX_VIVADO/bin/vivado`` or ``vivado`` on PATH."""
    path = os.environ.get("XILINX_VIVADO")
    exe = None
    if path and not _is_placeholder(path) and (Path(path) / "bin" / "vivado").exists():
        exe = str(Path(path) / "bin" / "vivado")
    elif shutil.which("vivado"):
        exe = shutil.which("vivado")
        path = str(Path(exe).resolve().parent.parent)
    else:
        path = None
    version = None
    if path:
        m = re.search(r"(20\d{2}\.\d)", path)
        version = m.group(1) if m else None
    hls = bool(shutil.which("vitis_hls") or shutil.which("vitis-run"))
    missing = []
    if exe is None:
        missing.append(
            "Vivado (no `vivado` on PATH and no valid XILINX_VIVADO; "
            "source <Xilinx>/Vivado/2024.2/settings64.sh)"
        )
    if not hls:
        missing.append("Vitis HLS (no `vitis_hls`/`vitis-run` on PATH; source <Xilinx>/Vitis/2024.2/settings64.sh)")
    return VivadoInfo(exe is not None, version, path, hls, missing)


def finn_deps_missing() -> list[str]:
    """finn-plus's external sources the IP generation needs (``finn deps update``
    fetches them from GitHub: finn-hlslib, board files). Empty when present."""
    import importlib.util

    spec = importlib.util.find_spec("finn")
    if spec is None or not spec.origin:
        return ["finn-plus (run `make install-hw`)"]
    deps = Path(os.environ.get("FINN_DEPS") or Path(spec.origin).resolve().parent.parent / "finn_deps")
    missing = []
    if not (deps / "finn-hlslib").is_dir():
        missing.append(f"finn-hlslib in {deps} (run `finn deps update` once, with internet access)")
    if not (deps / "board_files").is_dir():
        missing.append(f"PYNQ board files in {deps}/board_files (run `finn deps update`)")
    return missing


_prepared: dict | None = None


def prepare(build_dir: str | os.PathLike | None = None) -> dict:
    """Prepare the process environment for finn-plus; idempotent.

    Returns a dict: ``finn_build_dir``, ``finn_settings``, ``vivado`` (the
    :class:`VivadoInfo` as a dict) and ``workarounds`` (what was applied).
    """
    global _prepared
    if _prepared is not None and build_dir is None:
        return _prepared
    bdir = Path(build_dir or os.environ.get("FINN_BUILD_DIR") or DEFAULT_BUILD_DIR).absolute()
    bdir.mkdir(parents=True, exist_ok=True)
    os.environ["FINN_BUILD_DIR"] = str(bdir)
    # A settings file that need not exist: finn-plus then uses its defaults
    # plus the environment, and leaves ~/.finn alone.
    os.environ.setdefault("FINN_SETTINGS", str(bdir / "finn-settings.yaml"))
    # finn-plus would otherwise use 3/4 of all cores for code generation.
    os.environ.setdefault("NUM_DEFAULT_WORKERS", "1")

    info = vivado_info()
    applied = []
    if not info.present:
        # Work-around 2: placeholder XILINX_VIVADO ending in a version.
        if not os.environ.get("XILINX_VIVADO") or not _is_placeholder(os.environ["XILINX_VIVADO"]):
            os.environ["XILINX_VIVADO"] = str(
                bdir / _PLACEHOLDER_MARK / "Vivado" / PLACEHOLDER_VIVADO_VERSION
            )
        applied.append("XILINX_VIVADO placeholder")
        if _bind_missing_xsi_simengine():
            applied.append("finn.xsi.SimEngine=None")
    _prepared = {
        "finn_build_dir": str(bdir),
        "finn_settings": os.environ["FINN_SETTINGS"],
        "vivado": info.as_dict(),
        "workarounds": applied,
    }
    return _prepared


def _bind_missing_xsi_simengine() -> bool:
    """Work-around 1 (finn-plus 1.6.1): ``finn.builder.build_dataflow_steps`` does ``from finn.xsi
    import SimEngine``, which finn.xsi resolves lazily (module ``__getattr__``) and raises OSError for
    without Vivado; binding the name to None first makes the import a plain attribute lookup (RTL
    simulation is never used without Vivado). tests/test_hw.py fails if finn.xsi's ``__getattr__``
    changes (source fingerprint, :data:`LIBRARY_TARGETS`) or the builder stops importing."""
    try:
        import finn.xsi
    except ImportError:  # finn-plus not installed: nothing to work around
        return False
    if "SimEngine" not in vars(finn.xsi):
        finn.xsi.SimEngine = None
    return True


def use_finn_build_dir(path: str | os.PathLike) -> Path:
    """Make finn-plus write its generated code (HLS/RTL sources, partitions, driver
    staging) under ``path`` from now on - e.g. ``build/<name>/finn_tmp`` so a
    build folder holds all of its outputs.

    Targets finn-plus 1.6.1: its settings object (``finn.util.settings.get_settings()``,
    a pydantic ``FINNSettings``) holds ``finn_build_dir``, which finn's ``make_build_dir``
    reads; the field is set there (as finn's own ``finn config`` command sets it), and
    ``FINN_BUILD_DIR`` for child processes. tests/test_hw.py fails when finn-plus changes
    ``get_settings``/``make_build_dir`` (source fingerprints) or stops honouring the field."""
    p = Path(path).absolute()
    p.mkdir(parents=True, exist_ok=True)
    os.environ["FINN_BUILD_DIR"] = str(p)
    try:
        from finn.util.settings import get_settings
    except ImportError:  # pragma: no cover - finn-plus not installed
        return p
    get_settings().finn_build_dir = p
    return p


@contextlib.contextmanager
def finn_settings(**fields: str | os.PathLike):
    """Inside the block, finn-plus uses these folders (e.g. ``finn_deps``: its external sources such as
    finn-hlslib; ``finn_custom_hls``): the fields of finn-plus 1.6.1's settings object (what
    ``get_settings`` returns: the same object and targets as :func:`use_finn_build_dir`), and their
    ``FINN_<FIELD>`` environment variables for child processes. Both restored afterwards."""
    from finn.util.settings import get_settings  # finn-plus is optional: only where it is asked for

    settings = get_settings()
    env_name = {k: k.upper() for k in fields}  # finn_deps -> FINN_DEPS
    old = {k: (getattr(settings, k), os.environ.get(env_name[k])) for k in fields}
    try:
        for k, v in fields.items():
            setattr(settings, k, Path(v))
            os.environ[env_name[k]] = str(v)
        yield settings
    finally:
        for k, (field, env) in old.items():
            setattr(settings, k, field)
            name = env_name[k]
            if env is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = env


#: The library functions the work-arounds of this module and of hw/ depend on, with the library
#: version they were written against and a fingerprint of their source (sha256 of
#: ``inspect.getsource``, first 16 hex digits). :func:`library_drift` lists what changed;
#: tests/test_hw.py fails on any difference, so a finn-plus/qonnx upgrade cannot silently break a
#: work-around. Who changes a work-around updates its fingerprints here.
LIBRARY_TARGETS: dict[str, dict] = {
    # _bind_missing_xsi_simengine: finn.xsi resolves SimEngine lazily; build_dataflow_steps imports it
    "finn.xsi.__getattr__": {"dist": "finn-plus", "version": "1.6.1", "source": "79c9a10fafdcea3f"},
    # use_finn_build_dir
    "finn.util.settings.get_settings": {"dist": "finn-plus", "version": "1.6.1", "source": "e897565cfd1fa28c"},
    "finn.util.basic.make_build_dir": {"dist": "finn-plus", "version": "1.6.1", "source": "859a305038c8e7d6"},
    # hw/packing.py fast_packing
    "finn.util.data_packing.pack_innermost_dim_as_hex_string": {"dist": "finn-plus", "version": "1.6.1", "source": "be569fa9e20fbdf1"},
    # hw/emulate.py faster_finn_python_execution
    "qonnx.custom_op.general.xnorpopcount.xnorpopcountmatmul": {"dist": "qonnx", "version": "1.0.0", "source": "0f01536219eca11a"},
    "finn.custom_op.fpgadataflow.matrixvectoractivation.MVAU.execute_node": {"dist": "finn-plus", "version": "1.6.1", "source": "69790c5fde837cb9"},
    # hw/build.py contained_finn_runner
    "finn.builder.build_dataflow.setup_logging": {"dist": "finn-plus", "version": "1.6.1", "source": "b3e6b29473ae2629"},
    # hw/recipe.py recording
    "qonnx.core.modelwrapper.ModelWrapper.get_initializer": {"dist": "qonnx", "version": "1.0.0", "source": "acf96b1bc0e0664c"},
    "qonnx.core.modelwrapper.ModelWrapper.set_initializer": {"dist": "qonnx", "version": "1.0.0", "source": "2eec0980cc2de94d"},
    "qonnx.core.modelwrapper.ModelWrapper.rename_tensor": {"dist": "qonnx", "version": "1.0.0", "source": "0db45a4cd64999c2"},
    "qonnx.core.modelwrapper.ModelWrapper.make_empty_exec_context": {"dist": "qonnx", "version": "1.0.0", "source": "d739d0ca33941104"},
}


def _resolve(qualified: str):
    import importlib

    parts = qualified.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(qualified)


def source_fingerprint(qualified: str) -> str:
    """sha256 (16 hex digits) of the source of a function/method given by its dotted path."""
    import hashlib
    import inspect

    prepare()  # the builder module imports only after the work-arounds
    return hashlib.sha256(inspect.getsource(_resolve(qualified)).encode()).hexdigest()[:16]


def library_drift(targets: dict[str, dict] | None = None) -> list[str]:
    """What differs from :data:`LIBRARY_TARGETS`: installed versions and source fingerprints."""
    from importlib.metadata import version

    out = []
    for qualified, t in (targets or LIBRARY_TARGETS).items():
        v = version(t["dist"])
        if v != t["version"]:
            out.append(f"{qualified}: {t['dist']} {v} installed, written against {t['version']}")
        fp = source_fingerprint(qualified)
        if fp != t.get("source"):
            out.append(f"{qualified}: source fingerprint {fp}, recorded {t.get('source')}")
    return out


def finn_missing() -> str | None:
    """None when finn-plus imports (after :func:`prepare`), else why not and how to install it."""
    try:
        prepare()
        import finn.transformation.qonnx.convert_qonnx_to_finn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return (f"finn-plus 1.6.1 is not importable ({type(e).__name__}: {e}); install it with "
                "`make install-hw` (QONNX export works without it)")
    return None


def finn_available() -> bool:
    return finn_missing() is None
