"""FINN's C++ simulation (cppsim) of a folded dataflow model, without Vitis HLS.

finn-plus 1.6.1 simulates an HLS layer in C++ ("cppsim"): ``PrepareCppSim``
writes a ``main()`` per layer that streams the layer's input from ``.npy``
files through the finn-hlslib function it instantiates; ``CompileCppSim``
compiles it with g++ (``HLSBackend.compile_singlenode_code``); with
``SetExecMode("cppsim")`` FINN's ``execute_onnx`` runs the executables layer by
layer. RTL layers have no C++ model: in cppsim mode FINN executes them in
Python (``Thresholding_rtl``, ``ConvolutionInputGenerator_rtl``, ...).

That compile line names what a Vitis HLS install provides::

    g++ -o node_model <code_gen_dir>/*.cpp <finn>/templates/npy2stream/cnpy.cpp
        -I<finn>/templates/npy2stream -I$FINN_DEPS/finn-hlslib -I$FINN_DEPS/attention-hlslib
        -I$FINN_CUSTOM_HLS -I$XILINX_HLS/include --std=c++17 -O3 -lz -fno-builtin -fno-inline
        -L$XILINX_HLS/lnx64/lib/csim -lhlsmc++-GCC46
        -L$XILINX_HLS/lnx64/tools/fpo_v7_1 -lgmp -lmpfr -lIp_floating_point_v7_1_bitacc_cmodel

This module runs exactly that machinery (PrepareCppSim, CompileCppSim,
SetExecMode, execute_onnx) and provides only what is missing without Vitis:

* **finn-hlslib** (``FINN_DEPS``): ``$FINN_DEPS/finn-hlslib`` if set; else
  FINN's own deps folder if ``finn deps update`` filled it; else the archive in
  ``../shared/vendor/`` (beside the repository), unpacked into the cache; else
  the commit finn-plus pins, fetched by FINN's own ``DependencyUpdater``
  (``git clone`` + ``checkout``; needs the internet).
* **a stand-in ``XILINX_HLS``** (when no real Vitis HLS is set up): the
  open-source ``ap_int.h``/``ap_fixed.h`` (Xilinx/HLS_arbitrary_Precision_Types,
  vendored or fetched at the pinned commit) with one added member
  (``ap_int_base::sign_flag``, which Vitis' ap_int has and finn-hlslib's
  LabelSelect uses), fedfinn's own stand-in headers (``hw/cppsim_include/``:
  ``hls_stream.h``, ``hls_vector.h``, ``hls_half.h``, ``ap_axi_sdata.h``,
  ``ap_float.h``, ``hls_math.h``, an ``ap_int.h`` wrapper adding ``half``), and
  empty static libraries for the four Vitis libraries on the link line (nothing
  the generated code calls is in them: a call would fail to link).
* **finn-hlslib compatibility** (``hw/cppsim_compat/``): finn-plus 1.6.1
  generates code for a newer finn-hlslib (8d979e2) than the one vendored here
  (0141fa8). Two probe compiles check for the two interfaces it uses that
  0141fa8 lacks (``unflatten``; ``Pool_batch`` on ``hls::vector`` streams);
  only for a finn-hlslib that fails a probe is an overlay made (the upstream
  files, plus fedfinn's header in place of the one that lacks the interface).

Everything assembled lives in a cache folder (``$FEDFINN_CACHE/cppsim``, default
``~/.cache/fedfinn/cppsim``), keyed by content hashes. Compiled layers are
cached too: a model's layers compile into ``work/<model signature>/<layer>``
(the signature covers every layer attribute, shape and data type, and the
toolchain - not the weights, which FINN streams from an ``.npy`` at run time for
``mem_mode=internal_decoupled``); a layer is recompiled only when the hash of
its generated sources differs from the one stored beside its executable. A
file lock makes one process at a time use such a folder. While FINN compiles,
its ``g++`` runs through ``hw/cppsim_gxx.py``, which compiles the source all
layers share (FINN's ``cnpy.cpp``) once into a cached object file; FINN's
command line and flags are otherwise kept as they are.

One layout difference is FINN's own: in cppsim mode a depthwise
``ConvolutionInputGenerator_rtl`` interleaves its output by SIMD for the HLS
pool after it; :func:`python_layout` undoes that permutation before tensors are
compared with FINN's Python execution (:func:`compare`).

Use::

    env = prepare_env()                 # raises CppSimUnavailable with what is missing
    with CppSim(model, env) as sim:     # code generation + compilation (2-4 jobs)
        ctx = sim.run(x_uint8_nhwc)     # every tensor of FINN's cppsim execution
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from export.finn_env import finn_settings, prepare

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INCLUDE_DIR = HERE / "cppsim_include"  # fedfinn's stand-ins for Vitis HLS headers
COMPAT_DIR = HERE / "cppsim_compat"  # fedfinn's finn-hlslib compatibility headers

#: The open-source ap_int/ap_fixed headers (what ../shared/vendor/ holds), fetched
#: at this commit when no archive is there.
APTYPES_GIT = ("https://github.com/Xilinx/HLS_arbitrary_Precision_Types.git",
               "200a9aecaadf471592558540dc5a88256cbf880f")
#: Bump when the way the stand-in tree or the overlay is assembled changes.
ASSEMBLY_VERSION = "1"

#: The four Vitis libraries finn-plus 1.6.1 links every cppsim executable against,
#: relative to $XILINX_HLS (hlsbackend.py: compile_singlenode_code).
VITIS_LINK_LIBS = [
    "lnx64/lib/csim/libhlsmc++-GCC46.a",  # Vitis C simulation runtime (hls::stream etc. in Vitis)
    "lnx64/tools/fpo_v7_1/libIp_floating_point_v7_1_bitacc_cmodel.a",  # floating-point IP C model
    "lnx64/tools/fpo_v7_1/libgmp.a",  # GMP and MPFR, shipped by Vitis for the floating-point model
    "lnx64/tools/fpo_v7_1/libmpfr.a",
]
# An empty ar archive: eight bytes of magic, no members. The linker accepts it and
# resolves nothing from it, so a generated layer that needed one of these
# libraries would fail to link instead of running a fake.
_EMPTY_AR = b"!<arch>\n"


class CppSimUnavailable(RuntimeError):
    """Something cppsim needs is missing (the message says what and how to get it)."""


# --------------------------------------------------------------------------
# cache, hashing, locking
# --------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("FEDFINN_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "fedfinn") / "cppsim"


def vendor_dir() -> Path:
    """``../shared/vendor`` beside the repository (the offline sources)."""
    return REPO.parent / "shared" / "vendor"


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_digest(root: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative paths and contents of the files under ``root``."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_dir() or ".git" in p.relative_to(root).parts:
            continue
        if suffixes and p.suffix not in suffixes:
            continue
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def _publish(dest: Path) -> Iterator[Path]:
    """Build a cache entry in a temporary folder beside ``dest``, then rename it into
    place (atomic; if another process was faster, its entry is kept)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        yield tmp
        (tmp / ".complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _complete(dest: Path) -> bool:
    return (dest / ".complete").exists()


_LOCKS: dict[str, list] = {}  # path -> [file object, count]: re-entrant within a process
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> None:
    key = str(path)
    with _LOCKS_GUARD:
        if key in _LOCKS:
            _LOCKS[key][1] += 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        _LOCKS[key] = [f, 1]
    fcntl.flock(f, fcntl.LOCK_EX)  # another process using the folder: wait for it


def _unlock(path: Path) -> None:
    key = str(path)
    with _LOCKS_GUARD:
        entry = _LOCKS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _LOCKS[key]
    fcntl.flock(entry[0], fcntl.LOCK_UN)
    entry[0].close()


# --------------------------------------------------------------------------
# tools and sources
# --------------------------------------------------------------------------


def _gxx() -> str | None:
    """The real g++ (never fedfinn's shim, should it be on PATH)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "gxx-shim-" not in p)
    return shutil.which("g++", path=path)


def _gxx_version() -> str:
    out = subprocess.run(["g++", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"


def _compile_probe(code: str, includes: list[Path], link: bool = False, extra: list[str] | None = None
                   ) -> tuple[bool, str]:
    """Compile a snippet with g++ (syntax only unless ``link``); (ok, compiler output)."""
    with tempfile.TemporaryDirectory(prefix="fedfinn-probe-") as d:
        src = Path(d) / "probe.cpp"
        src.write_text(code)
        cmd = [_gxx() or "g++", "--std=c++17", *[f"-I{p}" for p in includes], str(src)]
        cmd += ["-o", str(Path(d) / "probe")] if link else ["-fsyntax-only"]
        cmd += extra or []
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def tool_problems() -> list[str]:
    """What is missing on this machine to compile FINN's cppsim (empty when nothing)."""
    problems = []
    try:
        import finn  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        problems.append(f"finn-plus is not importable ({type(e).__name__}: {e}); run `make install-hw`")
    if _gxx() is None:
        problems.append("g++ not found on PATH (FINN compiles cppsim with g++; e.g. `apt install g++`)")
        return problems
    ok, out = _compile_probe("#include <zlib.h>\nint main() { return zlibVersion() ? 0 : 1; }\n", [],
                             link=True, extra=["-lz"])
    if not ok:
        last = out.strip().splitlines()[-1] if out.strip() else ""
        problems.append("zlib development files missing (FINN's cnpy.cpp includes <zlib.h> and links -lz; "
                        f"e.g. `apt install zlib1g-dev`): {last}")
    return problems


def _unpack(archive: Path) -> Path:
    """Unpack a ``git archive`` tarball into the cache (keyed by its sha256); the
    folder it holds (e.g. ``finn-hlslib``) is returned."""
    sha = _sha256_file(archive)
    stem = archive.name.split(".tar")[0]
    dest = cache_root() / "src" / f"{stem}-{sha[:16]}"
    if not _complete(dest):
        with _publish(dest) as tmp:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise CppSimUnavailable(f"{archive} should hold one top-level folder, found {[p.name for p in tops]}")
    return tops[0]


def _git_fetch(url: str, commit: str, dest: Path, timeout: float = 100.0) -> Path:
    """``git clone`` + ``git checkout <commit>`` (what FINN's DependencyUpdater does)."""
    if _complete(dest):
        return dest / "src"
    if shutil.which("git") is None:
        raise CppSimUnavailable(f"git not found: cannot fetch {url}@{commit[:12]}")
    with _publish(dest) as tmp:
        for cmd in (["git", "clone", "--quiet", url, str(tmp / "src")],
                    ["git", "-C", str(tmp / "src"), "checkout", "--quiet", commit]):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CppSimUnavailable(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s (offline?)") from None
            if r.returncode != 0:
                raise CppSimUnavailable(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}")
    return dest / "src"


def _finn_pinned_hlslib() -> tuple[str, str, Path]:
    """(url, commit, definitions file) of the finn-hlslib that finn-plus pins."""
    import yaml
    from finn.interface.settings import FINNSettings

    depfile = FINNSettings().finn_deps_definitions
    data = yaml.safe_load(depfile.read_text())["git_deps"]["finn-hlslib"]
    return str(data["url"]), str(data["commit"]), depfile


def _fetch_hlslib_like_finn() -> Path:
    """finn-hlslib at finn-plus's pinned commit, fetched by FINN's own DependencyUpdater
    into the cache (a user online without ``finn deps update`` or a vendored copy)."""
    from finn.interface.manage_deps import DependencyUpdater

    url, commit, depfile = _finn_pinned_hlslib()
    loc = cache_root() / "fetched" / f"finn-deps-{commit[:12]}"
    upd = DependencyUpdater(loc, depfile, git_timeout_s=100, non_interactive=True)
    if upd.is_outdated("finn-hlslib") and not upd.install_dependency("finn-hlslib"):
        raise CppSimUnavailable(f"fetching finn-hlslib {commit[:12]} from {url} failed (offline?)")
    return loc / "finn-hlslib"


def find_hlslib() -> tuple[Path, str]:
    """(finn-hlslib folder, where it came from), in the order FINN_DEPS, FINN's deps
    folder, ../shared/vendor, fetched at finn-plus's pinned commit."""
    tried = []
    env = os.environ.get("FINN_DEPS")
    if env:
        p = Path(env) / "finn-hlslib"
        if p.is_dir():
            return p, f"FINN_DEPS ({p})"
        tried.append(f"FINN_DEPS={env} has no finn-hlslib/")
    else:
        tried.append("FINN_DEPS is not set")
    try:
        from finn.interface.settings import FINN_ROOT

        p = Path(FINN_ROOT) / "finn_deps" / "finn-hlslib"
        if p.is_dir():
            return p, f"FINN's deps folder ({p}, from `finn deps update`)"
        tried.append(f"no {p} (`finn deps update` not run)")
    except ImportError:
        pass
    archives = sorted(vendor_dir().glob("finn-hlslib-*.tar.gz"))
    if archives:
        return _unpack(archives[-1]), f"vendored {archives[-1].name} (sha256 {_sha256_file(archives[-1])[:12]})"
    tried.append(f"no finn-hlslib-*.tar.gz in {vendor_dir()}")
    if os.environ.get("FEDFINN_CPPSIM_FETCH", "1") != "0":
        try:
            p = _fetch_hlslib_like_finn()
            return p, f"fetched at finn-plus's pinned commit {_finn_pinned_hlslib()[1][:12]} ({p})"
        except CppSimUnavailable as e:
            tried.append(str(e))
        except Exception as e:  # FINN's updater raises its own errors
            tried.append(f"fetching with FINN's DependencyUpdater failed: {type(e).__name__}: {e}")
    else:
        tried.append("fetching disabled (FEDFINN_CPPSIM_FETCH=0)")
    raise CppSimUnavailable("no finn-hlslib: " + "; ".join(tried))


def find_aptypes() -> tuple[Path, str]:
    """(include folder with the open-source ap_int.h/ap_fixed.h, where it came from)."""
    archives = sorted(vendor_dir().glob("HLS_arbitrary_Precision_Types-*.tar.gz"))
    if archives:
        top = _unpack(archives[-1])
        return top / "include", f"vendored {archives[-1].name} (sha256 {_sha256_file(archives[-1])[:12]})"
    if os.environ.get("FEDFINN_CPPSIM_FETCH", "1") == "0":
        raise CppSimUnavailable(f"no HLS_arbitrary_Precision_Types-*.tar.gz in {vendor_dir()} and fetching "
                                "is disabled (FEDFINN_CPPSIM_FETCH=0)")
    url, commit = APTYPES_GIT
    src = _git_fetch(url, commit, cache_root() / "fetched" / f"HLS_arbitrary_Precision_Types-{commit[:12]}")
    return src / "include", f"fetched {url}@{commit[:12]}"


def real_vitis_hls() -> Path | None:
    """``$XILINX_HLS`` when it is a real Vitis HLS install (not a fedfinn stand-in)."""
    p = os.environ.get("XILINX_HLS")
    if not p:
        return None
    p = Path(p)
    if (p / "FEDFINN_STANDIN.txt").exists() or not (p / "include" / "hls_stream.h").exists():
        return None
    return p


# --------------------------------------------------------------------------
# the stand-in XILINX_HLS tree and the finn-hlslib overlay
# --------------------------------------------------------------------------

_SIGN_FLAG_ANCHOR = "  static const int width = _AP_W;\n"
_SIGN_FLAG_LINE = ("  static const bool sign_flag = _AP_S;  // added by fedfinn (hw/cppsim.py): "
                   "Vitis HLS' ap_int has it\n")
_MODIFIED_NOTICE = ("// NOTE: modified by fedfinn (hw/cppsim.py) for FINN's C++ simulation without Vitis HLS:\n"
                    "// ap_int_base gains `static const bool sign_flag = _AP_S;` (a member of Vitis HLS'\n"
                    "// ap_int that finn-hlslib's LabelSelect_Batch uses). Otherwise unchanged.\n")


def build_standin_hls(aptypes_include: Path, aptypes_origin: str) -> Path:
    """The stand-in ``XILINX_HLS`` folder (in the cache): ``include/`` and the empty
    libraries of FINN's link line."""
    key = _digest(ASSEMBLY_VERSION, tree_digest(aptypes_include), tree_digest(INCLUDE_DIR, (".h",)))[:16]
    dest = cache_root() / f"standin-xilinx-hls-{key}"
    if _complete(dest):
        return dest
    with _publish(dest) as tmp:
        inc = tmp / "include"
        shutil.copytree(aptypes_include, inc)
        # ap_int.h: fedfinn's wrapper (adds `half`) in front of the upstream file
        (inc / "fedfinn_upstream").mkdir()
        os.rename(inc / "ap_int.h", inc / "fedfinn_upstream" / "ap_int.h")
        # ap_int_base::sign_flag (the one addition to the upstream headers)
        base = inc / "ap_int_base.h"
        text = base.read_text()
        if text.count(_SIGN_FLAG_ANCHOR) != 1:
            raise CppSimUnavailable(f"{base}: unexpected ap_int_base (cannot add sign_flag); "
                                    f"HLS_arbitrary_Precision_Types at {APTYPES_GIT[1][:12]} is what fedfinn expects")
        base.write_text(_MODIFIED_NOTICE + text.replace(_SIGN_FLAG_ANCHOR, _SIGN_FLAG_ANCHOR + _SIGN_FLAG_LINE))
        for h in sorted(INCLUDE_DIR.glob("*.h")):
            shutil.copy2(h, inc / h.name)
        for lib in VITIS_LINK_LIBS:
            (tmp / lib).parent.mkdir(parents=True, exist_ok=True)
            (tmp / lib).write_bytes(_EMPTY_AR)
        (tmp / "FEDFINN_STANDIN.txt").write_text(
            "fedfinn's stand-in for a Vitis HLS install (XILINX_HLS), made by hw/cppsim.py for FINN's cppsim.\n"
            f"include/: open-source ap_int/ap_fixed headers ({aptypes_origin}; ap_int.h moved to\n"
            "fedfinn_upstream/, ap_int_base.h + sign_flag) and fedfinn's hw/cppsim_include/*.h.\n"
            "lnx64/: empty static libraries named like the Vitis ones on FINN's link line.\n")
    return dest


_PROBE_UNFLATTEN = """
#include <ap_int.h>
#include "flatten.hpp"
int main() { ap_uint<3> b[2]; unflatten(b, ap_uint<6>(5)); return int(b[0]); }
"""
_PROBE_POOL = """
#include <hls_stream.h>
#include <hls_vector.h>
#include "bnn-library.h"
#include "pool.hpp"
int main() {
  hls::stream<hls::vector<ap_uint<2>, 2>> a("a"), b("b");
  MaxPoolFunction<hls::vector<ap_uint<2>, 2>> f;
  Pool_batch<4, 2>(a, b, f);
}
"""
#: compat header -> probe that fails when the finn-hlslib lacks what it provides
COMPAT_PROBES = {"flatten.hpp": _PROBE_UNFLATTEN, "pool.hpp": _PROBE_POOL}


def _probe_hlslib(hlslib: Path, include: Path) -> dict[str, str]:
    """compat header -> compiler output, for each interface ``hlslib`` lacks (cached)."""
    key = _digest(ASSEMBLY_VERSION, tree_digest(hlslib), tree_digest(include),
                  *[f"{k}:{v}" for k, v in COMPAT_PROBES.items()], _gxx_version())[:16]
    memo = cache_root() / "probes" / f"{key}.json"
    if memo.exists():
        return json.loads(memo.read_text())
    missing = {}
    for header, code in COMPAT_PROBES.items():
        ok, out = _compile_probe(code, [hlslib, include])
        if not ok:
            missing[header] = out
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps(missing, indent=1))
    return missing


def build_hlslib_overlay(hlslib: Path, headers: list[str]) -> Path:
    """A ``FINN_DEPS`` folder whose ``finn-hlslib`` is ``hlslib`` with fedfinn's compat
    ``headers`` in place of the upstream ones (kept as ``fedfinn_upstream/<name>``)."""
    key = _digest(ASSEMBLY_VERSION, tree_digest(hlslib), tree_digest(COMPAT_DIR, (".hpp",)), *headers)[:16]
    dest = cache_root() / f"finn-deps-overlay-{key}"
    if _complete(dest):
        return dest
    with _publish(dest) as tmp:
        lib = tmp / "finn-hlslib"
        shutil.copytree(hlslib, lib, ignore=shutil.ignore_patterns(".git"))
        (lib / "fedfinn_upstream").mkdir()
        for h in headers:
            if (lib / h).exists():
                os.rename(lib / h, lib / "fedfinn_upstream" / h)
            shutil.copy2(COMPAT_DIR / h, lib / h)
        (lib / "FEDFINN_OVERLAY.txt").write_text(
            f"finn-hlslib from {hlslib} with fedfinn's hw/cppsim_compat/ headers in place of: "
            f"{', '.join(headers)} (upstream files in fedfinn_upstream/). Made by hw/cppsim.py.\n")
    return dest


# --------------------------------------------------------------------------
# the environment FINN's compile line needs
# --------------------------------------------------------------------------


@dataclass
class CppSimEnv:
    finn_deps: Path  # FINN_DEPS for the compile (holds finn-hlslib/)
    xilinx_hls: Path  # XILINX_HLS for the compile
    finn_custom_hls: Path  # FINN_CUSTOM_HLS (finn-plus's custom_hls folder)
    hlslib_origin: str
    vitis: str  # "stand-in (...)" or "Vitis HLS at ..."
    compat_headers: list[str] = field(default_factory=list)  # fedfinn headers overlaid on finn-hlslib
    digest: str = ""  # everything besides the generated code that enters a compile
    gxx: str = ""

    def gxx_shim(self) -> Path:
        """A folder with a ``g++`` that runs hw/cppsim_gxx.py (object cache for the
        sources every layer shares; see there) with this Python."""
        import sys

        script = HERE / "cppsim_gxx.py"
        text = f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n'
        dest = cache_root() / f"gxx-shim-{_digest(text)[:16]}"
        if not _complete(dest):
            with _publish(dest) as tmp:
                (tmp / "g++").write_text(text)
                (tmp / "g++").chmod(0o755)
        return dest

    def describe(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @contextlib.contextmanager
    def activate(self, object_cache: bool = False) -> Iterator["CppSimEnv"]:
        """Set FINN_DEPS, XILINX_HLS and FINN_CUSTOM_HLS for FINN (and its worker
        processes) inside the block; restore them after. ``object_cache``: FINN's
        ``g++`` runs through hw/cppsim_gxx.py (``PATH``), which compiles FINN's
        shared ``cnpy.cpp`` once instead of once per layer."""
        prepare()  # FINN's build folder and settings (export/finn_env.py)
        names = {"XILINX_HLS": self.xilinx_hls}
        if object_cache:
            names.update({"PATH": f"{self.gxx_shim()}{os.pathsep}{os.environ.get('PATH', '')}",
                          "FEDFINN_REAL_GXX": _gxx(), "FEDFINN_OBJ_CACHE": cache_root() / "objects"})
        saved = {k: os.environ.get(k) for k in names}
        try:
            os.environ.update({k: str(v) for k, v in names.items()})
            with finn_settings(finn_deps=self.finn_deps, finn_custom_hls=self.finn_custom_hls):
                yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def prepare_env() -> CppSimEnv:
    """Assemble (or find in the cache) everything FINN's cppsim compile line needs.
    Raises :class:`CppSimUnavailable` saying what is missing."""
    problems = tool_problems()
    if problems:
        raise CppSimUnavailable("; ".join(problems))
    from finn.interface.interface_utils import resolve_module_path

    hlslib, origin = find_hlslib()
    real = real_vitis_hls()
    if real is not None:
        xhls, vitis = real, f"Vitis HLS at {real}"
    else:
        ap_inc, ap_origin = find_aptypes()
        xhls = build_standin_hls(ap_inc, ap_origin)
        vitis = f"stand-in {xhls} (fedfinn hw/cppsim_include + {ap_origin})"
    missing = _probe_hlslib(hlslib, xhls / "include")
    finn_deps = hlslib.parent
    if missing:
        finn_deps = build_hlslib_overlay(hlslib, sorted(missing))
        still = _probe_hlslib(finn_deps / "finn-hlslib", xhls / "include")
        if still:
            raise CppSimUnavailable("finn-hlslib with fedfinn's compat headers still fails to compile: "
                                    + "; ".join(f"{k}: {v[-800:]}" for k, v in still.items()))
    from importlib.metadata import version

    gxx = _gxx_version()
    digest = _digest(ASSEMBLY_VERSION, tree_digest(finn_deps / "finn-hlslib"), tree_digest(xhls / "include"),
                     version("finn-plus"), gxx)
    return CppSimEnv(finn_deps=finn_deps, xilinx_hls=xhls,
                     finn_custom_hls=Path(resolve_module_path("custom_hls")),
                     hlslib_origin=origin, vitis=vitis, compat_headers=sorted(missing), digest=digest, gxx=gxx)


# --------------------------------------------------------------------------
# a model in cppsim
# --------------------------------------------------------------------------

_VOLATILE_ATTRS = {"code_gen_dir_cppsim", "executable_path", "code_gen_dir_ipgen", "ipgen_path", "ip_path",
                   "ip_vlnv", "rtlsim_so", "exec_mode", "res_estimate", "res_hls", "cycles_estimate",
                   "cycles_rtlsim"}


def model_signature(model, env: CppSimEnv) -> str:
    """Hash of what the generated C++ of ``model`` depends on, except weights: every
    node's type and attributes (but paths and execution mode), tensor shapes and
    FINN data types, and the toolchain (``env.digest``)."""
    from onnx import helper

    h = hashlib.sha256(env.digest.encode())
    for n in model.graph.node:
        h.update(f"{n.op_type}|{n.domain}|{n.name}".encode())
        for a in sorted(n.attribute, key=lambda a: a.name):
            if a.name not in _VOLATILE_ATTRS:
                h.update(f"{a.name}={helper.get_attribute_value(a)!r}".encode())
        # tensors by position (FINN's builds name some of them at random)
        for t in list(n.input) + ["->"] + list(n.output):
            h.update((t if t == "->" else f"{model.get_tensor_shape(t)}:{model.get_tensor_datatype(t)}").encode())
    return h.hexdigest()[:20]


def _sources_digest(code_dir: Path, env: CppSimEnv) -> str:
    return _digest(env.digest, tree_digest(code_dir, suffixes=(".cpp", ".h", ".hpp")))


def is_hls(node) -> bool:
    return node.domain == "finn.custom_op.fpgadataflow.hls"


@dataclass
class CompileReport:
    hls_layers: list[str]  # compiled (now or from the cache) and run as C++
    compiled_now: list[str]
    reused: list[str]  # executables from an earlier run, same generated sources
    python_fallback: list[tuple[str, str]]  # (name, op type) executed in Python in cppsim mode
    codegen_s: float
    compile_s: float
    jobs: int
    workdir: str


class CppSim:
    """A folded dataflow model prepared and compiled for FINN's cppsim.

    ``cache=True``: the layers compile in a stable folder of the cache
    (``work/<model signature>``), executables whose generated sources did not
    change are reused, and FINN's shared ``cnpy.cpp`` is compiled once
    (:meth:`CppSimEnv.activate`). ``cache=False``: FINN's defaults (fresh folders
    under ``FINN_BUILD_DIR``, every layer compiled with FINN's g++ command as is).

    Use as a context manager (or call :meth:`close`): with ``cache=True`` it holds
    a lock on its work folder, which the executables read inputs from and write
    outputs to.
    """

    def __init__(self, model, env: CppSimEnv, jobs: int | None = None, cache: bool = True):
        from finn.transformation.fpgadataflow.compile_cppsim import CompileCppSim
        from finn.transformation.fpgadataflow.prepare_cppsim import PrepareCppSim
        from finn.transformation.fpgadataflow.set_exec_mode import SetExecMode
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.custom_op.registry import getCustomOp

        if not isinstance(model, ModelWrapper):
            model = ModelWrapper(str(model))
        jobs = jobs or default_jobs()
        self.env = env
        self._closed = False
        m = copy.deepcopy(model)
        hls_nodes = [n for n in m.graph.node if is_hls(n)]
        self._lockfile = None
        if cache:
            self.workdir = cache_root() / "work" / model_signature(m, env)
            self._lockfile = self.workdir / ".lock"
            _lock(self._lockfile)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedfinn-cppsim-"))
        todo, reused = [n.name for n in hls_nodes], []
        try:
            for n in hls_nodes:  # PrepareCppSim generates into an existing code_gen_dir_cppsim
                d = self.workdir / n.name
                d.mkdir(parents=True, exist_ok=True)
                getCustomOp(n).set_nodeattr("code_gen_dir_cppsim", str(d))
            t0 = time.time()
            with env.activate(object_cache=cache), _fast_weight_packing():
                m = m.transform(PrepareCppSim(num_workers=jobs))
                t1 = time.time()
                if cache:
                    todo = []
                    for n in m.graph.node:
                        if not is_hls(n):
                            continue
                        d = Path(getCustomOp(n).get_nodeattr("code_gen_dir_cppsim"))
                        stamp, exe = d / ".fedfinn-sources-sha256", d / "node_model"
                        if exe.exists() and stamp.exists() and stamp.read_text() == _sources_digest(d, env):
                            getCustomOp(n).set_nodeattr("executable_path", str(exe))
                            reused.append(n.name)
                        else:
                            stamp.unlink(missing_ok=True)
                            exe.unlink(missing_ok=True)
                            todo.append(n.name)
                if todo:
                    # FINN's CompileCppSim on the layers to (re)compile only, `jobs` in parallel
                    sub = copy.deepcopy(m)
                    keep = [copy.deepcopy(n) for n in sub.graph.node if n.name in todo]
                    del sub.graph.node[:]  # (removing protobuf elements one by one in a loop is unsafe)
                    sub.graph.node.extend(keep)
                    sub = sub.transform(CompileCppSim(num_workers=jobs), cleanup=False)
                    built = {n.name: getCustomOp(n).get_nodeattr("executable_path") for n in sub.graph.node}
                    for n in m.graph.node:
                        if n.name in built:
                            getCustomOp(n).set_nodeattr("executable_path", built[n.name])
                            d = Path(getCustomOp(n).get_nodeattr("code_gen_dir_cppsim"))
                            if cache:
                                (d / ".fedfinn-sources-sha256").write_text(_sources_digest(d, env))
            t2 = time.time()
            m = m.transform(SetExecMode("cppsim"))
        except BaseException:
            self.close()
            raise
        self.model = m
        self.report = CompileReport(
            hls_layers=[n.name for n in hls_nodes], compiled_now=todo, reused=reused,
            python_fallback=[(n.name, n.op_type) for n in m.graph.node if not is_hls(n)],
            codegen_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), jobs=jobs, workdir=str(self.workdir))

    # -- use
    def __enter__(self) -> "CppSim":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._lockfile is not None:
                _unlock(self._lockfile)

    def run(self, x: np.ndarray, start_node=None, end_node=None, context: dict | None = None
            ) -> dict[str, np.ndarray]:
        """FINN's cppsim execution of one input (batch 1): every tensor of the graph.
        ``start_node``/``end_node``/``context``: run a part of the graph only
        (FINN's execute_onnx; ``context`` supplies the tensors it starts from)."""
        from finn.core.onnx_exec import execute_onnx
        from qonnx.custom_op.registry import getCustomOp

        if self._closed:
            raise RuntimeError("CppSim was closed")
        for n in self.model.graph.node:  # no stale output can pass for a result
            if is_hls(n):
                for f in Path(getCustomOp(n).get_nodeattr("code_gen_dir_cppsim")).glob("output_*.npy"):
                    f.unlink()
        inp = self.model.graph.input[0].name
        feed = dict(context or {})
        feed[inp] = np.asarray(x, dtype=np.float32)
        return execute_onnx(self.model, feed, return_full_exec_context=True,
                            start_node=start_node, end_node=end_node)


def default_jobs() -> int:
    """Parallel compiles: 2, or up to 4 where there are more cores."""
    return max(2, min(4, os.cpu_count() or 2))


@contextlib.contextmanager
def _fast_weight_packing():
    """hw.packing.fast_packing (the project's vectorized, string-for-string tested
    drop-in for FINN's weight packer) while FINN writes the layers' weight files."""
    try:
        from hw.packing import fast_packing
    except ImportError:  # pragma: no cover - moved elsewhere: FINN's own packer, slower
        yield
        return
    with fast_packing():
        yield


# --------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------


def python_layout(model, tensor: str, value: np.ndarray) -> np.ndarray:
    """A tensor of a cppsim execution in the layout of FINN's Python execution.

    The only difference FINN makes: in cppsim mode a depthwise
    ``ConvolutionInputGenerator_rtl`` interleaves its output channels by SIMD
    (``convolutioninputgenerator_rtl.py``, execute_node: (H, W, K, C/SIMD, SIMD) ->
    (H, W, C/SIMD, K, SIMD)), the order the HLS pool/VVAU layer after it reads; the
    Python execution keeps im2col order (H, W, K, C). This undoes that permutation
    (a pure reordering: every value is still compared)."""
    from qonnx.custom_op.registry import getCustomOp

    prod = model.find_producer(tensor)
    if prod is None or prod.op_type != "ConvolutionInputGenerator_rtl":
        return value
    op = getCustomOp(prod)
    if not op.get_nodeattr("depthwise"):
        return value
    simd = op.get_nodeattr("SIMD")
    oh, ow = op.get_nodeattr("OFMDim")
    kh, kw = op.get_nodeattr("ConvKernelDim")
    ch = op.get_nodeattr("IFMChannels")
    v = np.asarray(value).reshape(1, oh, ow, ch // simd, kh * kw, simd).transpose(0, 1, 2, 4, 3, 5)
    return v.reshape(1, oh, ow, kh * kw * ch)


def activation_tensors(model) -> list[str]:
    """The graph input and every node's output (what :func:`compare` checks)."""
    return [model.graph.input[0].name] + [o for n in model.graph.node for o in n.output]


def compare(model, cppsim_ctx: dict, ref_ctx: dict, image: int | None = None,
            tensors: list[str] | None = None) -> tuple[int, list[str]]:
    """Compare activation tensors (default: the graph input and every node's output)
    of a cppsim execution with a reference (FINN's Python execution, or one image of
    the numpy engine: ``image`` selects it from batched arrays), exactly. Returns
    (tensors compared, mismatch descriptions); a tensor missing on either side counts
    as a mismatch."""
    bad, done = [], 0
    for name in tensors if tensors is not None else activation_tensors(model):
        if cppsim_ctx.get(name) is None:
            bad.append(f"{name}: missing in the cppsim execution")
            continue
        if name not in ref_ctx or ref_ctx[name] is None:
            bad.append(f"{name}: missing in the reference")
            continue
        ref = np.asarray(ref_ctx[name])
        if image is not None:
            ref = ref[image : image + 1]
        got = python_layout(model, name, np.asarray(cppsim_ctx[name]))
        done += 1
        if got.size != ref.size:
            bad.append(f"{name}: {got.shape} vs {ref.shape}")
            continue
        got = got.reshape(ref.shape)
        if not np.array_equal(got, ref):
            diff = np.argwhere(got != ref)
            prod = model.find_producer(name)
            bad.append(f"{name} (output of {prod.name if prod else 'graph input'}): "
                       f"{len(diff)} of {ref.size} values differ, first at {tuple(diff[0])}: "
                       f"{got[tuple(diff[0])]} vs {ref[tuple(diff[0])]}")
    return done, bad
