"""A ``g++`` that caches object files: what FINN's cppsim compile line runs under hw/cppsim.py.

finn-plus compiles every HLS layer with one command (hlsbackend.py)::

    g++ -o <dir>/node_model <dir>/*.cpp <finn>/templates/npy2stream/cnpy.cpp <flags>

so FINN's ``cnpy.cpp`` (the .npy reader/writer, ~40 % of a layer's compile time)
is compiled again for every layer. hw/cppsim.py puts a ``g++`` shim that runs
this script first on ``PATH`` while FINN's ``CompileCppSim`` runs. Sources
shared between layers (outside the output's folder: ``cnpy.cpp``) are compiled
on their own (``-c``, same flags) into a cache of object files keyed by the
preprocessed source, the flags and the compiler (like ccache's preprocessor
mode); the layer's own sources are compiled and linked with them in one command
with FINN's flags. Same translation units, flags and link as FINN's command;
the shared one is compiled once. Any other command line is passed to the real
g++ unchanged.

Environment: ``FEDFINN_REAL_GXX`` (the real g++), ``FEDFINN_OBJ_CACHE`` (folder).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_SUFFIXES = (".cpp", ".cc", ".cxx", ".c")
# options that only matter for linking / only for compiling
LINK_PREFIXES = ("-l", "-L", "-Wl,")
COMPILE_PREFIXES = ("-I", "-D", "-U", "--std", "-std")


def _split(args: list[str]):
    """(output, sources, compile flags, link flags), or None for a command line of
    another shape (passed through)."""
    if any(a in ("-c", "-E", "-S", "-M", "-MM", "-x", "-") for a in args):
        return None
    out, sources, comp, link = None, [], [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            out = args[i + 1]
            i += 2
            continue
        if not a.startswith("-") and a.endswith(SOURCE_SUFFIXES):
            sources.append(a)
        elif not a.startswith("-"):
            return None  # objects, libraries by path, ...: not FINN's shape
        elif a.startswith(LINK_PREFIXES):
            link.append(a)
        elif a.startswith(COMPILE_PREFIXES):
            comp.append(a)
        else:  # -O3, -fno-inline, ...: for both steps
            comp.append(a)
            link.append(a)
        i += 1
    if out is None or not sources:
        return None
    return out, sources, comp, link


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True)
    sys.stdout.buffer.write(r.stdout)
    sys.stderr.buffer.write(r.stderr)
    return r


def main(argv: list[str]) -> int:
    real = os.environ.get("FEDFINN_REAL_GXX")
    cache = os.environ.get("FEDFINN_OBJ_CACHE")
    if not real:
        sys.stderr.write("fedfinn cppsim_gxx: FEDFINN_REAL_GXX is not set\n")
        return 2
    shape = _split(argv) if cache else None
    if shape is None:
        return subprocess.run([real, *argv]).returncode
    out, sources, comp, link = shape
    cache_dir = Path(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    own_dir = Path(out).resolve().parent
    own = [s for s in sources if Path(s).resolve().parent == own_dir]
    shared = [s for s in sources if s not in own]
    version = subprocess.run([real, "--version"], capture_output=True).stdout
    objects = []
    for src in shared:
        pre = subprocess.run([real, "-E", *comp, src], capture_output=True)
        if pre.returncode != 0:  # let the real compiler report the error
            return _run([real, *argv]).returncode
        h = hashlib.sha256(version)
        h.update("\0".join(comp).encode() + b"\0")
        h.update(pre.stdout)
        obj = cache_dir / f"{Path(src).stem}-{h.hexdigest()[:32]}.o"
        if not obj.exists():
            fd, tmp = tempfile.mkstemp(suffix=".o", dir=cache_dir)
            os.close(fd)
            r = _run([real, "-c", *comp, src, "-o", tmp])
            if r.returncode != 0:
                os.unlink(tmp)
                return r.returncode
            os.replace(tmp, obj)  # atomic: a parallel compile of the same source is harmless
        objects.append(str(obj))
    # FINN's order: sources first, then the flags (libraries after the objects that need them)
    return _run([real, "-o", out, *own, *objects, *comp, *[a for a in link if a not in comp]]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
