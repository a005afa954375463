"""Verilator simulation of a FINN ``Thresholding_rtl`` layer, its AXI-lite port included.

:func:`verilate` compiles a layer's filled top (an :class:`hw.rtl_check.RtlUnit`)
with the generic C++ testbench ``hw/rtl/axi_layer_tb.cpp`` into an executable,
cached by a hash of everything that goes into it (Verilator version, options,
sources, testbench). :class:`ThresholdingRTL` knows the layer's stream and
AXI-lite formats:

* :meth:`~ThresholdingRTL.pack` / :meth:`~ThresholdingRTL.unpack`: numpy
  tensors (NHWC, channels last) <-> AXI-stream words, ``PE`` values per word,
  element ``pe`` at bits ``[pe*W, (pe+1)*W)`` (FINN's packing);
* :func:`dat_words`: the 32-bit words of a ``runtime_weights/*.dat`` file,
  read as the board driver reads them (finn-plus-driver's
  ``load_runtime_weights``: ``int(line, 16)`` into a uint32 array, written with
  ``mmio.write_mm(0, words.tobytes())``, so word ``i`` goes to byte address
  ``4*i``; with ``verify`` it reads all of them back and compares);
* :meth:`~ThresholdingRTL.reference`: FINN's own Python execution of the layer
  (``Thresholding.execute_node``) with given thresholds.

A script (:meth:`~ThresholdingRTL.script`) is a list of testbench commands; the
simulation runs in a scratch copy of the layer's generated folder, so the
``$readmemh`` of the compiled-in (initial) thresholds finds its ``.dat`` files.

Verilator 5.006 note: ``axi/hdl/axilite.sv`` holds unpacked structs assigned
with assignment patterns; 5.006 (its first release with unpacked structs)
lints them but emits C++ that does not compile ("no match for operator="), so
the model is built with ``--structs-packed`` (Verilator's own option to pack
them, as every release before 5.006 did; the RTL sources are not changed).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finn.custom_op.fpgadataflow.thresholding import Thresholding
from qonnx.core.datatype import DataType
from qonnx.custom_op.registry import getCustomOp

from .rtl_check import INSTALL_HINT, RtlUnit, verilator_version

TB_CPP = Path(__file__).resolve().parent / "rtl" / "axi_layer_tb.cpp"
#: Verilator options of the simulation model (see the module docstring).
#: X handling: 'x assignments and uninitialized variables get values the run
#: picks (``+verilator+rand+reset+2``, seeded), not silently zero. The C++ is
#: compiled unoptimized: the runs are short, the compile dominates.
SIM_OPTIONS = ("--structs-packed", "-Wno-fatal", "-Wno-lint", "-Wno-style", "--x-assign", "unique",
               "--x-initial", "unique", "-MAKEFLAGS", "OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0")
DEFAULT_CACHE = Path(os.environ.get("FEDFINN_RTL_CACHE", Path.home() / ".cache" / "fedfinn-rtl"))


class SimError(RuntimeError):
    pass


def _digest(unit: RtlUnit, version: str, options: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    h.update(f"verilator {version}\n{' '.join(options)}\ntop {unit.top}\n".encode())
    for f in [*unit.files, str(TB_CPP)]:
        h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()[:20]


def verilate(unit: RtlUnit, cache_dir: str | Path | None = None, jobs: int = 2,
             options: tuple[str, ...] = SIM_OPTIONS) -> tuple[Path, bool]:
    """Compile ``unit`` with the testbench; returns (executable, True if it came from the cache)."""
    exe = shutil.which("verilator")
    version = verilator_version(exe)
    if not exe or not version:
        raise FileNotFoundError(f"verilator not found; {INSTALL_HINT}")
    cache = Path(cache_dir or DEFAULT_CACHE)
    out = cache / f"{unit.top}-{_digest(unit, version, options)}"
    binary = out / "tb"
    if binary.exists():
        return binary, True
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=cache))
    incs = sorted({str(Path(f).parent) for f in unit.files})
    cmd = [exe, "--cc", "--exe", "--build", "-j", str(jobs), *options, "--prefix", "Vdut",
           "--top-module", unit.top, "--Mdir", str(tmp), "-o", "tb", *[f"-I{d}" for d in incs],
           *unit.files, str(TB_CPP)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if p.returncode != 0 or not (tmp / "tb").exists():
        log = (p.stdout + p.stderr).strip().splitlines()
        shutil.rmtree(tmp, ignore_errors=True)
        raise SimError(f"verilator could not build {unit.top}:\n" + "\n".join(log[-25:]))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return binary, False


def dat_words(path: str | Path) -> list[int]:
    """The words of a runtime-weight file, parsed as the board driver parses them."""
    words = [int(x, 16) for x in Path(path).read_text().strip().split()]
    too_wide = [w for w in words if w >= 1 << 32]
    if too_wide:  # the driver's np.uint32 array cannot hold them
        raise ValueError(f"{path}: {len(too_wide)} words wider than 32 bits (e.g. {too_wide[0]:#x})")
    return words


@dataclass
class SimRun:
    outputs: list[list[int]]  # per `stream` command: the output words
    reads: list[tuple[int, int]]  # per `read` command: (rdata, rresp)
    bresps: list[int]
    cycles: list[int]  # per `stream` command
    lines: list[str]


def run_script(binary: Path, unit: RtlUnit, commands: list[str], seed: int = 1, timeout: float = 600) -> SimRun:
    """Run the testbench on ``commands`` in a scratch copy of the layer's folder; X values
    (``'x``, uninitialized state) are random, from ``seed``."""
    with tempfile.TemporaryDirectory(prefix="rtlsim_") as tmp:
        for f in Path(unit.code_gen_dir).iterdir():
            if f.is_file() and f.suffix == ".dat":
                shutil.copy(f, tmp)
        args = [str(binary), "+verilator+rand+reset+2", f"+verilator+seed+{seed}"]
        p = subprocess.run(args, input="\n".join(commands) + "\n", capture_output=True, text=True,
                           cwd=tmp, timeout=timeout)
    lines = p.stdout.splitlines()
    bad = [ln for ln in lines if ln.startswith(("timeout", "error"))]
    if p.returncode != 0 or bad:
        raise SimError(f"testbench failed (rc {p.returncode}): {bad[:3] or lines[-3:]} {p.stderr[-2000:]}")
    run = SimRun([], [], [], [], lines)
    cur: list[int] = []
    for ln in lines:
        tag, *rest = ln.split()
        if tag == "O":
            cur.append(int(rest[0], 16))
        elif tag == "R":
            run.reads.append((int(rest[0], 16), int(rest[1])))
        elif tag == "B":
            run.bresps.append(int(rest[0]))
        elif tag == "ok" and rest[0] == "stream":
            run.outputs.append(cur)
            run.cycles.append(int(rest[1]))
            cur = []
    return run


class ThresholdingRTL:
    """A ``Thresholding_rtl`` node of a model whose code was generated."""

    def __init__(self, model, node_name: str):
        self.model = model
        self.node = model.get_node_from_name(node_name)
        if self.node is None or not self.node.op_type.startswith("Thresholding_rtl"):
            raise ValueError(f"{node_name} is not a Thresholding_rtl node")
        self.inst = getCustomOp(self.node)
        g = self.inst.get_nodeattr
        self.pe, self.channels, self.n = g("PE"), g("NumChannels"), g("numSteps")
        self.fold = self.channels // self.pe
        self.idt = DataType[g("inputDataType")]
        self.odt = DataType[g("outputDataType")]
        self.wdt = model.get_tensor_datatype(self.node.input[1])
        self.bias = int(g("ActVal"))
        self.wi = self.idt.bitwidth()
        self.o_bits = self.inst.get_outstream_width() // self.pe
        self.runtime_writeable = bool(g("runtime_writeable_weights"))
        self.thresholds = model.get_initializer(self.node.input[1])  # the compiled-in ones

    # -- streams ---------------------------------------------------------------
    def pack(self, x: np.ndarray) -> list[str]:
        """(..., C) integers -> hex input words, one per (pixel, channel fold)."""
        a = np.asarray(x)
        if a.shape[-1] != self.channels:
            raise ValueError(f"last axis must be the {self.channels} channels, got {a.shape}")
        if self.idt.name == "BIPOLAR":
            a = (a + 1) // 2
        v = np.asarray(np.rint(a), dtype=object).reshape(-1, self.fold, self.pe)
        if not (np.all(v >= self.idt.min()) and np.all(v <= self.idt.max())):
            raise ValueError(f"inputs outside {self.idt.name}")
        mask = (1 << self.wi) - 1
        words = []
        for row in v.reshape(-1, self.pe):
            w = 0
            for pe, val in enumerate(row):
                w |= (int(val) & mask) << (pe * self.wi)
            words.append(f"{w:x}")
        return words

    def unpack(self, words: list[int], shape: tuple[int, ...]) -> np.ndarray:
        """Output words -> values as FINN's execution gives them (float32, shape ``shape``)."""
        mask = (1 << self.o_bits) - 1
        vals = []
        for w in words:
            for pe in range(self.pe):
                u = (w >> (pe * self.o_bits)) & mask
                if self.bias < 0 and u >> (self.o_bits - 1):  # signed output (count + negative bias)
                    u -= 1 << self.o_bits
                vals.append(u)
        y = np.asarray(vals, dtype=np.float32)
        if self.odt.name == "BIPOLAR":
            y = 2 * y - 1
        return y.reshape(shape)

    # -- FINN's execution ------------------------------------------------------
    def reference(self, x: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
        """FINN's Python execution of this layer on ``x`` with ``thresholds`` (default: compiled-in)."""
        t = self.thresholds if thresholds is None else thresholds
        ctx = {self.node.input[0]: np.asarray(x, dtype=np.float32), self.node.input[1]: np.asarray(t)}
        Thresholding.execute_node(self.inst, ctx, self.model.graph)  # what Thresholding_rtl runs in cppsim
        return ctx[self.node.output[0]]

    def threshold_words(self, thresholds: np.ndarray, path: str | Path) -> list[int]:
        """The ``decoupled_runtime`` words finn-plus writes for ``thresholds`` (make_weight_file)."""
        self.inst.make_weight_file(np.asarray(thresholds), "decoupled_runtime", str(path))
        return dat_words(path)

    # -- scripts ---------------------------------------------------------------
    @staticmethod
    def write_commands(words: list[int], readback: bool = True) -> list[str]:
        """What the driver does: word i to byte address 4*i, then (verify) read all back."""
        cmds = [f"write {4 * i:x} {w:08x}" for i, w in enumerate(words)]
        if readback:
            cmds += [f"read {4 * i:x}" for i in range(len(words))]
        return cmds

    @staticmethod
    def stream_commands(words: list[str]) -> list[str]:
        return [f"stream {len(words)}", *words]


#: Extra options of a memstream model: the testbench drives the memstream wrapper's ports.
MEMSTREAM_OPTIONS = SIM_OPTIONS + ("-CFLAGS", "-DTB_MEMSTREAM")


class MemstreamRTL:
    """The memstream weight memory of an HLS layer with ``mem_mode=internal_decoupled``
    (its ``<layer>_memstream_wrapper.v``): what the layer's runtime-weight file is
    written into, and what streams the weights to the (HLS) compute.

    memstream.sv does not go through Verilator 5.006 as shipped (known failure
    ``memstream-unpacked-concat``); :func:`hw.rtl_check.workaround_unit` gives a unit
    with the one statement rewritten, which is what this class is used with."""

    def __init__(self, model, node_name: str, wrapper: str | Path):
        self.node = model.get_node_from_name(node_name)
        self.inst = getCustomOp(self.node)
        text = Path(wrapper).read_text()

        def param(name):
            m = re.search(rf"parameter\s+{name}\s*=\s*([^,\n]+)", text)
            return m.group(1).strip().strip('"') if m else None

        self.depth, self.width, self.sets = int(param("DEPTH")), int(param("WIDTH")), int(param("SETS"))
        self.init_file = param("INIT_FILE")
        self.words_per_line = 1 << max(0, math.ceil(math.log2(self.width / 32)))

    @staticmethod
    def lines(path: str | Path) -> list[int]:
        """A memory image (one hex memory line per text line, as $readmemh reads it)."""
        return [int(x, 16) for x in Path(path).read_text().split()]

    def memory_image(self, weights: np.ndarray, path: str | Path) -> list[int]:
        """The memory image finn-plus compiles in for ``weights`` (memblock.dat)."""
        self.inst.make_weight_file(np.asarray(weights), "decoupled_verilog_dat", str(path))
        return self.lines(path)

    def runtime_words(self, weights: np.ndarray, path: str | Path) -> list[int]:
        """The runtime-weight words finn-plus writes for ``weights`` (the driver's .dat)."""
        self.inst.make_weight_file(np.asarray(weights), "decoupled_runtime", str(path))
        return dat_words(path)
