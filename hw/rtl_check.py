"""RTL checks with open tools: Verilator lint of every RTL module a build uses.

A FINN build's RTL is (a) the templates finn-plus fills for each RTL layer in
``step_hw_codegen`` (``Thresholding_rtl``, ``ConvolutionInputGenerator_rtl``,
... : a wrapper with the layer's parameters, sometimes an ``_impl.sv``) plus
the finn-rtllib sources finn-plus ships (``finn/finn-rtllib``), and (b) the
memstream weight memories of HLS layers with ``mem_mode=internal_decoupled``
(``<layer>_memstream_wrapper.v`` + ``memstream*.sv`` + ``axilite.sv``: the
runtime-writable MVAU weights). A bitstream build adds width converters and
FIFOs (``StreamingDataWidthConverter_rtl``, ``StreamingFIFO_rtl``) after the
estimates; :func:`ancillary_layers` makes them the way finn-plus does
(``InsertDWC``, ``InsertFIFO(create_shallow_fifos=True)``, ``SpecializeLayers``,
``PrepareIP``) on a copy, so their filled templates are linted too. HLS C++
is not RTL (it needs Vitis HLS to become Verilog) and is not covered here.

Each unit (one layer instance, its filled top and the sources finn-plus lists
for it: ``get_rtl_file_list(abspath=True)``) is linted with
``verilator --lint-only -Wno-fatal --top-module <top>``. The result per unit:

* ``clean`` - no message; ``warnings`` - warnings only (counted per code);
* ``known-failure`` - every error matches an entry of :data:`KNOWN_FAILURES`
  (a Verilator limitation, with its reason); the entry's work-around is then
  applied to a scratch copy and linted again (``after_workaround``), to show
  whether anything else in the unit fails;
* ``error`` - anything else. A module that linted and now fails lands here.

``python -m hw.rtl_check BUILD [--no-ancillary] [--json OUT]`` lints a build
folder (``make hw`` output) and prints the table; :func:`lint_model` does the
same for a model whose code was generated.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.finn_env import prepare, use_finn_build_dir

prepare()
from finn.util.settings import get_settings  # noqa: E402
from finn.util.basic import getHWCustomOp  # noqa: E402
from finn.util.fpgadataflow import is_hls_node, is_rtl_node  # noqa: E402
from finn.transformation.fpgadataflow.insert_dwc import InsertDWC  # noqa: E402
from finn.transformation.fpgadataflow.insert_fifo import InsertFIFO  # noqa: E402
from finn.transformation.fpgadataflow.prepare_ip import PrepareIP  # noqa: E402
from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402
from qonnx.transformation.general import GiveUniqueNodeNames  # noqa: E402

from .build import find_intermediate  # noqa: E402

INSTALL_HINT = "`make install-rtl` installs it (Debian/Ubuntu: apt-get install verilator g++ make)"


# --------------------------------------------------------------------------
# the tool
# --------------------------------------------------------------------------


def verilator_version(exe: str | None = None) -> str | None:
    """``"5.006"`` for the ``verilator`` on PATH (or ``exe``), None when there is none."""
    exe = exe or shutil.which("verilator")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Verilator\s+(\d+\.\d+)", out)
    return m.group(1) if m else None


def finn_rtllib() -> Path:
    """finn-plus's own copy of finn-rtllib (what its builds reference)."""
    return Path(get_settings().finn_rtllib).resolve()


# --------------------------------------------------------------------------
# known Verilator limitations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFailure:
    """An error Verilator gives on a finn-rtllib source that Vivado accepts, with
    the reason, and a work-around used only for a second lint (extra Verilator
    options and/or text replacements in a scratch copy of the source), to see
    whether anything else in the unit fails."""

    key: str
    source: str  # path relative to finn-rtllib
    message: str  # regex on the error text (after "%Error: <file>:<line>:<col>: ")
    versions: tuple[str, ...]  # Verilator versions it was seen with
    reason: str
    replace: tuple[tuple[str, str], ...] = ()  # (old, new) in the scratch copy
    options: tuple[str, ...] = ()  # extra Verilator options
    # errors that follow from the first one (same source); known only together with it
    consequences: str | None = None

    def matches(self, err: "Message") -> bool:
        return err.file.endswith("/" + self.source) and re.search(self.message, err.text) is not None

    def explains(self, err: "Message") -> bool:
        return self.matches(err) or (self.consequences is not None and err.file.endswith("/" + self.source)
                                     and re.search(self.consequences, err.text) is not None)


_V5006 = ("5.006",)
KNOWN_FAILURES: tuple[KnownFailure, ...] = (
    KnownFailure(
        key="memstream-unpacked-concat",
        source="memstream/hdl/memstream.sv",
        message=r"Assignment pattern missed initializing elements",
        versions=_V5006,
        reason=(
            "memstream.sv:234 shifts its output SRL with an unpacked-array concatenation "
            "(`OSrl <= { Dat3, OSrl[0:FULL_CREDIT-3] };`, IEEE 1800-2017 10.10). Verilator 5.006 "
            "takes the braces for an assignment pattern with one item per array element and stops "
            "('Assignment pattern missed initializing elements'); unpacked-array concatenation came "
            "to Verilator in October 2023 (verilator/verilator#4558, 5.018). Every MVAU/VVAU with "
            "mem_mode=internal_decoupled - the runtime-writable weights - instantiates memstream."
        ),
        replace=((
            "if(Rs3)  OSrl <= { Dat3, OSrl[0:FULL_CREDIT-3] };",
            "if(Rs3) begin OSrl[0] <= Dat3; for(int i = 1; i < FULL_CREDIT-1; i++) OSrl[i] <= OSrl[i-1]; end",
        ),),
    ),
    KnownFailure(
        key="fifo-struct-constfunc",
        source="fifo/hdl/fifo.sv",
        message=r"can't determine constant for FUNCREF 'INIT_ABITS'",
        consequences=(r"can't convert a STRUCTSEL '(lo|hi)' to constant|variable isn't const"
                      r"|Generate If condition must evaluate to constant"),
        versions=_V5006,
        reason=(
            "fifo.sv computes its memory geometry with a constant function returning an unpacked "
            "struct (`abits_t INIT_ABITS()`); Verilator 5.006, the first release with unpacked "
            "structs, cannot evaluate it as a constant. Its option --structs-packed (pack unpacked "
            "structs, as every Verilator before 5.006 did) gets past it."
        ),
        options=("--structs-packed",),
    ),
    KnownFailure(
        key="fifo-unpacked-concat",
        source="fifo/hdl/fifo.sv",
        message=r"Assignment pattern missed initializing elements|Unexpected Call",
        versions=_V5006,
        reason=(
            "fifo.sv shifts with unpacked-array concatenations in five places: line 195 "
            "(`A <= { idat, A[0:DEPTH_IMPL-2] };`, the shift-register FIFOs: DEPTH <= 33, i.e. every "
            "FIFO before sizing) and lines 375, 393, 405, 414 (the read pipelines of the BRAM/URAM "
            "FIFOs, DEPTH > 257 with ram_style auto). The memstream.sv:234 limitation; for the "
            "memory-backed ones Verilator 5.006 sometimes reports it as an internal error "
            "('Unexpected Call')."
        ),
        replace=(
            ("if(push)  A <= { idat, A[0:DEPTH_IMPL-2] };",
             "if(push) begin A[0] <= idat; for(int i = 1; i < DEPTH_IMPL; i++) A[i] <= A[i-1]; end"),
            ("if(re)     ODatLo <= { ODatLo[1:PIPE_DEPTH-1], MemLo[rd_ptr_lo] };",
             "if(re) begin ODatLo[0:PIPE_DEPTH-2] <= ODatLo[1:PIPE_DEPTH-1]; "
             "ODatLo[PIPE_DEPTH-1] <= MemLo[rd_ptr_lo]; end"),
            ("if(re)     ODatHi <= { ODatHi[1:PIPE_DEPTH-1], MemHi[rd_ptr_hi] };",
             "if(re) begin ODatHi[0:PIPE_DEPTH-2] <= ODatHi[1:PIPE_DEPTH-1]; "
             "ODatHi[PIPE_DEPTH-1] <= MemHi[rd_ptr_hi]; end"),
            ("else if(re)  OSelLo <= { OSelLo[1:PIPE_DEPTH-1], !RdPtr[$left(RdPtr)] };",
             "else if(re) begin OSelLo[0:PIPE_DEPTH-2] <= OSelLo[1:PIPE_DEPTH-1]; "
             "OSelLo[PIPE_DEPTH-1] <= !RdPtr[$left(RdPtr)]; end"),
            ("else if(re)  OVld <= { OVld[1:PIPE_DEPTH-1], drain };",
             "else if(re) begin OVld[0:PIPE_DEPTH-2] <= OVld[1:PIPE_DEPTH-1]; OVld[PIPE_DEPTH-1] <= drain; end"),
        ),
    ),
    KnownFailure(
        key="vpc-recursive-gcd",
        source="dwc/hdl/vpc.sv",
        message=r"Recursive function or task call: 'gcd'|can't determine constant for FUNCREF 'gcd'",
        versions=_V5006,
        reason=(
            "vpc.sv (the RTL data-width converter's core) computes gcd(PI, PO) with a recursive "
            "constant function; Verilator 5.006 rejects recursion ('Unsupported: Recursive function "
            "or task call'); recursive constant functions work from Verilator 5.038 "
            "(verilator/verilator#7173)."
        ),
        replace=((
            "return (b == 0)? a : gcd(b, a % b);",
            "while(b != 0) begin automatic int unsigned t = a % b; a = b; b = t; end\n\t\treturn a;",
        ),),
    ),
    KnownFailure(
        key="vpc-unpacked-concat",
        source="dwc/hdl/vpc.sv",
        message=r"Assignment pattern missed initializing elements|Unexpected Call",
        versions=_V5006,
        reason=(
            "vpc.sv's full-rate paths (genFull; which one a DWC uses depends on its in/out "
            "widths) shift their element buffer with unpacked-array concatenations "
            "(`Buf <= { Buf[1 +: N0-1], ... };`, lines 137 and 223): the memstream.sv:234 "
            "limitation again, sometimes reported as a Verilator internal error ('Unexpected Call')."
        ),
        replace=(
            # as vpc.sv:187 itself writes the shift (a slice copy Verilator accepts)
            ("if(N0 > 1)  Buf <= { Buf[1 +: N0-1], W0'('x) };",
             "if(N0 > 1) begin Buf[0 +: N0-1] <= Buf[1 +: N0-1]; Buf[N0-1] <= 'x; end"),
            ("if(N0 > 1)  Buf <= { Buf[1 +: N0-1], idat[0 +: GCD] };",
             "if(N0 > 1) begin Buf[0 +: N0-1] <= Buf[1 +: N0-1]; Buf[N0-1] <= idat[0 +: GCD]; end"),
        ),
    ),
    KnownFailure(
        key="fifo-gauge-fopen",
        source="fifo/hdl/fifo_gauge.sv",
        message=r"syntax error, unexpected \$fopen",
        versions=_V5006,
        reason=(
            "fifo_gauge.sv is FINN's behavioural FIFO for simulation only (`ifdef FINN_SIMULATION` "
            "in every FIFO wrapper; the bitstream uses fifo.sv). Verilator 5.006 does not parse "
            "`$fopen` in a variable's initializer; with that moved into an initial block it stops "
            "at the SystemVerilog queue (`Q[$]`) written with non-blocking assignments "
            "(BLKANDNBLK, and an internal error in V3Delayed): no simple work-around."
        ),
        replace=((
            'int  LogFd = (DATA_LOGFILE != "")? $fopen(DATA_LOGFILE, "w") : 0;',
            'int  LogFd = 0;\n\tinitial  if(DATA_LOGFILE != "")  LogFd = $fopen(DATA_LOGFILE, "w");',
        ),),
    ),
)

#: finn-rtllib sources that only simulations read (a define selects them); the
#: synthesized view of a unit leaves them out, one extra unit lints them.
SIM_ONLY = {"fifo/hdl/fifo_gauge.sv": "FINN_SIMULATION"}


# --------------------------------------------------------------------------
# units: what the build uses
# --------------------------------------------------------------------------


@dataclass
class RtlUnit:
    """One RTL layer instance: its top module and every source it needs."""

    layer: str  # ONNX node name
    op_type: str  # e.g. Thresholding_rtl, MVAU_hls (its memstream)
    kind: str  # the finn-rtllib component(s), e.g. thresholding, memstream, swg
    top: str  # top module (the filled template)
    files: list[str]
    code_gen_dir: str  # the layer's generated files (and the .dat files $readmemh reads)
    defines: list[str] = field(default_factory=list)
    view: str = "synthesis"  # or "simulation" (sources only FINN's simulations read)
    variant: str = ""  # e.g. "depth 1024" for the FIFO depth variants of ancillary_layers

    @property
    def include_dirs(self) -> list[str]:
        return sorted({str(Path(f).parent) for f in self.files})


def _kind(files: list[str], rtllib: Path) -> str:
    comps = []
    for f in files:
        p = Path(f).resolve()
        if rtllib in p.parents:
            c = p.relative_to(rtllib).parts[0]
            if c != "axi" and c not in comps:
                comps.append(c)
    return "+".join(comps) or "generated"


def _module_names(path: str) -> list[str]:
    text = Path(path).read_text(errors="replace")
    return re.findall(r"^\s*module\s+([A-Za-z_][A-Za-z0-9_$]*)", text, flags=re.M)


def _rel(f: str, rtllib: Path) -> str | None:
    p = Path(f).resolve()
    return str(p.relative_to(rtllib)) if rtllib in p.parents else None


def units_of(model) -> list[RtlUnit]:
    """The RTL units of a model whose code was generated (after ``step_hw_codegen``):
    one per RTL layer and one per memstream of a decoupled HLS layer, plus one
    simulation-view unit per kind that lists simulation-only sources."""
    rtllib = finn_rtllib()
    out: list[RtlUnit] = []
    sim_kinds: set[str] = set()
    for node in model.graph.node:
        if is_rtl_node(node):
            inst = getHWCustomOp(node)
            gen_dir = inst.get_nodeattr("code_gen_dir_ipgen")
            if not gen_dir:
                raise ValueError(f"{node.name}: no generated code (run step_hw_codegen first)")
            files = [str(f) for f in inst.get_rtl_file_list(abspath=True)]
            top = inst.get_nodeattr("gen_top_module")
            tops = [m for f in files if Path(f).parent == Path(gen_dir) for m in _module_names(f)]
            if top not in tops:  # wrappers named otherwise than gen_top_module
                cand = [m for m in tops if not m.endswith("_impl")]
                top = cand[0] if cand else top
            sim_only = [f for f in files if _rel(f, rtllib) in SIM_ONLY]
            synth = [f for f in files if f not in sim_only]
            kind = _kind(synth, rtllib)
            out.append(RtlUnit(node.name, node.op_type, kind, top, synth, gen_dir))
            if sim_only and kind not in sim_kinds:  # the simulation view, once per kind
                sim_kinds.add(kind)
                defines = sorted({SIM_ONLY[_rel(f, rtllib)] for f in sim_only})
                out.append(RtlUnit(node.name, node.op_type, _kind(files, rtllib), top, files, gen_dir,
                                   defines, "simulation"))
        elif is_hls_node(node):
            inst = getHWCustomOp(node)
            if "mem_mode" not in inst.get_nodeattr_types() or inst.get_nodeattr("mem_mode") != "internal_decoupled":
                continue
            gen_dir = inst.get_nodeattr("code_gen_dir_ipgen")
            wrappers = sorted(Path(gen_dir).glob("*_memstream_wrapper.v")) if gen_dir else []
            if not wrappers:
                raise ValueError(f"{node.name}: mem_mode=internal_decoupled but no memstream wrapper in {gen_dir!r}")
            for w in wrappers:  # the sources MVAU/VVAU's code_generation_ipi adds for it
                files = [str(rtllib / "axi/hdl/axilite.sv"), str(rtllib / "memstream/hdl/memstream_axi.sv"),
                         str(rtllib / "memstream/hdl/memstream.sv"), str(w)]
                out.append(RtlUnit(node.name, node.op_type, "memstream", w.stem, files, gen_dir))
    return out


#: FIFO depths linted besides the build's own (depth 2 before sizing): fifo.sv picks
#: its storage by depth (ram_style auto: <= 33 shift register, <= 257 LUTRAM,
#: <= 2028 BRAM, beyond URAM), and FIFO sizing in a bitstream build can pick any.
FIFO_DEPTH_VARIANTS = (64, 1024, 4096)


def ancillary_layers(model, fpgapart: str, clk_ns: float) -> tuple:
    """The width converters and FIFOs a bitstream build inserts, with their code
    generated: finn-plus's InsertDWC, InsertFIFO(create_shallow_fifos=True),
    SpecializeLayers and PrepareIP, as its step_set_fifo_depths does before the
    FIFO sizes are known (sizing needs Vivado's simulator), on a copy of
    ``model``. Three FIFOs (12+ bits wide) get the depths of
    :data:`FIFO_DEPTH_VARIANTS` instead of 2, so every storage kind of fifo.sv is
    generated. PrepareIP only generates code for layers without it: the build's
    own layers keep their code_gen_dir_ipgen and files. Returns (model, {layer:
    variant label})."""

    m = ModelWrapper(copy.deepcopy(model.model))
    m = m.transform(InsertDWC())
    m = m.transform(InsertFIFO(create_shallow_fifos=True))
    m = m.transform(SpecializeLayers(fpgapart))
    m = m.transform(GiveUniqueNodeNames())
    variants = {}
    wide = [n for n in m.get_nodes_by_op_type("StreamingFIFO_rtl")
            if getCustomOp(n).get_instream_width() >= 12 and getCustomOp(n).get_nodeattr("impl_style") == "rtl"]
    for n, depth in zip(wide, FIFO_DEPTH_VARIANTS):
        getCustomOp(n).set_nodeattr("depth", depth)
        variants[n.name] = f"depth {depth}"
    return m.transform(PrepareIP(fpgapart, clk_ns)), variants


# --------------------------------------------------------------------------
# lint
# --------------------------------------------------------------------------

_MSG = re.compile(r"^%(Error|Warning)(?:-([A-Z0-9_]+))?:\s*(Internal Error:\s*)?(?:([^:\s]+):(\d+):(?:\d+):)?\s*(.*)$")


@dataclass
class Message:
    severity: str  # Error | Warning
    code: str  # e.g. WIDTH ("" for plain errors, UNSUPPORTED, ...)
    file: str
    line: int
    text: str

    def short(self) -> str:
        where = f"{Path(self.file).name}:{self.line}: " if self.file else ""
        code = f"-{self.code}" if self.code else ""
        return f"%{self.severity}{code}: {where}{self.text}"


def parse_messages(output: str) -> list[Message]:
    msgs = []
    for line in output.splitlines():
        m = _MSG.match(line)
        if not m:
            continue
        sev, code, internal, f, ln, text = m.groups()
        if sev == "Error" and text.startswith("Exiting due to"):
            continue
        msgs.append(Message(sev, code or "", f or "", int(ln or 0), (internal or "") + text.strip()))
    return msgs


@dataclass
class LintResult:
    layer: str
    op_type: str
    kind: str
    top: str
    view: str
    variant: str
    status: str  # clean | warnings | known-failure | error
    returncode: int
    warnings: dict[str, int] = field(default_factory=dict)  # code -> count
    errors: list[str] = field(default_factory=list)  # the first error lines
    known: list[str] = field(default_factory=list)  # keys of the known failures met
    after_workaround: dict | None = None  # the lint with their work-arounds applied
    seconds: float = 0.0
    same_as: str | None = None  # linted once for an identical configuration (this layer)

    def as_dict(self) -> dict:
        return asdict(self)


def _lint(exe: str, unit: RtlUnit, files: list[str], options: list[str]) -> tuple[int, list[Message], str]:
    incs = sorted({str(Path(f).parent) for f in files})
    cmd = [exe, "--lint-only", "-Wno-fatal", *options, *[f"+define+{d}" for d in unit.defines],
           "--top-module", unit.top, *[f"-I{d}" for d in incs], *files]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=unit.code_gen_dir, timeout=600)
    out = p.stdout + p.stderr
    msgs = parse_messages(out)
    if p.returncode != 0 and not any(m.severity == "Error" for m in msgs):  # no parsable message
        msgs.append(Message("Error", "", "", 0, (out.strip().splitlines() or ["(no output)"])[-1]))
    return p.returncode, msgs, out


def _counts(msgs: list[Message]) -> dict[str, int]:
    return dict(sorted(Counter(m.code or "?" for m in msgs if m.severity == "Warning").items()))


def lint_unit(unit: RtlUnit, exe: str | None = None, max_errors: int = 5, max_rounds: int = 4) -> LintResult:
    """Lint one unit as shipped; when every error is a known failure, lint again
    with their work-arounds (repeatedly: a work-around can uncover the next one)."""
    exe = exe or shutil.which("verilator")
    if not exe:
        raise FileNotFoundError(f"verilator not found; {INSTALL_HINT}")
    t0 = time.time()
    rc, msgs, _ = _lint(exe, unit, unit.files, [])
    errs = [m for m in msgs if m.severity == "Error"]
    res = LintResult(unit.layer, unit.op_type, unit.kind, unit.top, unit.view, unit.variant,
                     "clean" if not msgs else "warnings", rc, _counts(msgs), [e.short() for e in errs[:max_errors]])
    if errs:
        hits = _known_for(errs)
        if hits is None:
            res.status = "error"
        else:
            res.status = "known-failure"
            res.known = [k.key for k in hits]
            res.after_workaround = _relint(exe, unit, hits, max_errors, max_rounds)
    res.seconds = round(time.time() - t0, 3)
    return res


def _known_for(errs: list[Message]) -> list[KnownFailure] | None:
    """The known failures that explain all of ``errs``; None if any error is unexplained."""
    hits = [k for k in KNOWN_FAILURES if any(k.matches(e) for e in errs)]
    if not hits or not all(any(k.explains(e) for k in hits) for e in errs):
        return None
    return hits


class StaleWorkaround(ValueError):
    """A work-around's text is no longer in the source (finn-rtllib changed)."""


def apply_workarounds(unit: RtlUnit, failures: list[KnownFailure], out_dir: str | Path) -> tuple[list[str], list[str]]:
    """The unit's files with the failures' text replacements applied to copies in
    ``out_dir`` (same relative paths under it), and the Verilator options they add."""
    rtllib = finn_rtllib()
    files, options = list(unit.files), []
    for k in failures:
        options += [o for o in k.options if o not in options]
        if not k.replace:
            continue
        src = str(rtllib / k.source)
        dst = Path(out_dir) / k.source  # same relative path: its errors still match k.source
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = dst.read_text() if dst.exists() else Path(src).read_text()
        for old, new in k.replace:
            if old in text:
                text = text.replace(old, new)
            elif new not in text:
                raise StaleWorkaround(f"{k.source} no longer holds {old!r}")
        dst.write_text(text)
        files = [str(dst) if f == src else f for f in files]
    return files, options


def workaround_unit(unit: RtlUnit, keys: list[str], out_dir: str | Path) -> tuple[RtlUnit, list[str]]:
    """A copy of ``unit`` whose sources carry the work-arounds of the known failures
    ``keys`` (scratch copies in ``out_dir``), and the Verilator options they add."""
    by_key = {k.key: k for k in KNOWN_FAILURES}
    files, options = apply_workarounds(unit, [by_key[k] for k in keys], out_dir)
    return RtlUnit(unit.layer, unit.op_type, unit.kind, unit.top, files, unit.code_gen_dir, list(unit.defines),
                   unit.view, unit.variant), options


def _relint(exe: str, unit: RtlUnit, hits: list[KnownFailure], max_errors: int, max_rounds: int) -> dict:
    applied: list[KnownFailure] = []
    with tempfile.TemporaryDirectory(prefix="rtl_workaround_") as tmp:
        for _ in range(max_rounds):
            applied += [k for k in hits if k not in applied]
            try:
                files, options = apply_workarounds(unit, applied, tmp)
            except StaleWorkaround as e:
                return {"status": "workaround-stale", "applied": [a.key for a in applied], "note": str(e)}
            rc, msgs, _ = _lint(exe, unit, files, options)
            errs = [m for m in msgs if m.severity == "Error"]
            new_hits = _known_for(errs) if errs else None
            if errs and new_hits and any(k not in applied for k in new_hits):
                hits = new_hits  # the next known failure showed up: apply it too
                continue
            status = "error" if errs else ("warnings" if msgs else "clean")
            return {"status": status, "returncode": rc, "applied": [a.key for a in applied],
                    "options": options, "warnings": _counts(msgs), "errors": [e.short() for e in errs[:max_errors]]}
    return {"status": "error", "applied": [a.key for a in applied], "note": "too many rounds"}


def _config_key(unit: RtlUnit) -> str:
    """Units whose sources are the same text up to the layer's names and folder
    (e.g. FIFOs of equal width and depth) lint the same: one lint serves them all."""
    h = hashlib.sha256(f"{unit.view} {unit.variant} {unit.defines}".encode())
    for f in unit.files:
        text = Path(f).read_text(errors="replace")
        for name in sorted({unit.top, unit.layer}, key=len, reverse=True):
            text = text.replace(name, "\0NAME\0")
        h.update(Path(f).name.replace(unit.top, "").replace(unit.layer, "").encode() + b"\0"
                 + text.replace(unit.code_gen_dir, "\0DIR\0").encode() + b"\0")
    return h.hexdigest()


def lint_units(units: list[RtlUnit], exe: str | None = None) -> list[LintResult]:
    """Lint each unit; a unit with the same configuration as an earlier one gets a
    copy of its result (``same_as`` names it)."""
    done: dict[str, LintResult] = {}
    out = []
    for u in units:
        key = _config_key(u)
        if key in done:
            first = done[key]
            r = LintResult(**{**first.as_dict(), "layer": u.layer, "op_type": u.op_type, "top": u.top,
                              "same_as": first.layer, "seconds": 0.0})
        else:
            r = done[key] = lint_unit(u, exe)
        out.append(r)
    return out


def lint_model(model, fpgapart: str | None = None, clk_ns: float | None = None, ancillary: bool = True,
               exe: str | None = None) -> dict:
    """Lint every RTL unit of ``model`` (code generated) and, with ``ancillary``,
    the DWCs and FIFOs a bitstream build adds. Returns the report dict."""
    exe = exe or shutil.which("verilator")
    version = verilator_version(exe)
    if not exe or not version:
        raise FileNotFoundError(f"verilator not found; {INSTALL_HINT}")
    t0 = time.time()
    units = units_of(model)
    if ancillary:
        if fpgapart is None or clk_ns is None:
            raise ValueError("ancillary=True needs fpgapart and clk_ns")
        have = {u.layer for u in units}
        extra, variants = ancillary_layers(model, fpgapart, clk_ns)
        for u in units_of(extra):
            if u.layer not in have:
                u.variant = variants.get(u.layer, "") if u.view == "synthesis" else ""
                units.append(u)
    return make_report(lint_units(units, exe), version, time.time() - t0)


def make_report(results: list[LintResult], version: str, seconds: float) -> dict:
    kinds: dict[str, dict] = {}
    for r in results:
        name = r.kind + (f" ({r.view})" if r.view != "synthesis" else "") + (f" ({r.variant})" if r.variant else "")
        k = kinds.setdefault(name,
                             {"units": 0, "status": Counter(), "warnings": Counter(), "after_workaround": Counter()})
        k["units"] += 1
        k["status"][r.status] += 1
        k["warnings"].update(r.warnings)
        if r.after_workaround:
            k["after_workaround"][r.after_workaround["status"]] += 1
    return {
        "verilator": version,
        "units": len(results),
        "distinct_configurations": sum(r.same_as is None for r in results),
        "status": dict(Counter(r.status for r in results)),
        "kinds": {name: {key: (dict(v) if isinstance(v, Counter) else v) for key, v in k.items()}
                  for name, k in sorted(kinds.items())},
        "known_failures": [
            {"key": k.key, "source": k.source, "versions": list(k.versions), "reason": k.reason,
             # units that met it, as shipped or once an earlier work-around got them further
             "units": sum(k.key in r.known or k.key in (r.after_workaround or {}).get("applied", [])
                          for r in results)} for k in KNOWN_FAILURES
        ],
        "seconds": round(seconds, 2),
        "results": [r.as_dict() for r in results],
    }


def format_report(rep: dict) -> str:
    lines = [f"Verilator {rep['verilator']}: {rep['units']} RTL units ({rep['distinct_configurations']} distinct) "
             f"linted in {rep['seconds']} s: "
             + ", ".join(f"{v} {k}" for k, v in sorted(rep["status"].items()))]
    lines.append(f"  {'kind':28s} {'units':>5s}  status; warnings (code x count); with the work-arounds")
    for name, k in rep["kinds"].items():
        st = ", ".join(f"{v} {s}" for s, v in sorted(k["status"].items()))
        w = " ".join(f"{c}x{n}" for c, n in sorted(k["warnings"].items()))
        aw = ", ".join(f"{v} {s}" for s, v in sorted(k["after_workaround"].items()))
        lines.append(f"  {name:28s} {k['units']:5d}  {st}; {w or '-'}" + (f"; {aw}" if aw else ""))
    bad = [r for r in rep["results"] if r["status"] == "error"]
    for r in bad:
        lines.append(f"  ERROR {r['layer']} ({r['top']}):")
        lines += [f"      {e}" for e in r["errors"]]
    for k in rep["known_failures"]:
        if k["units"]:
            lines.append(f"  known failure {k['key']} ({k['units']} units): {k['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# a build folder
# --------------------------------------------------------------------------


def codegen_model_path(build_dir: str | Path) -> Path:
    """The model ``step_hw_codegen`` left in a build folder (its layers name their generated code)."""
    return find_intermediate(build_dir, "step_hw_codegen")


def lint_build(build_dir: str | Path, ancillary: bool = True, out: str | Path | None = None) -> dict:
    """Lint a ``make hw`` build folder; writes ``report/rtl_lint.json`` there (or ``out``).
    The DWCs/FIFOs' generated code goes to ``finn_tmp/rtl_check`` (made afresh)."""
    build_dir = Path(build_dir)
    cfg = json.loads((build_dir / "build_config.json").read_text())
    model = ModelWrapper(str(codegen_model_path(build_dir)))
    before = os.environ.get("FINN_BUILD_DIR")
    if ancillary:
        scratch = build_dir / "finn_tmp" / "rtl_check"
        shutil.rmtree(scratch, ignore_errors=True)
        use_finn_build_dir(scratch)
    try:
        rep = lint_model(model, cfg["fpga_part"], cfg["synth_clk_period_ns"], ancillary=ancillary)
    finally:
        if ancillary and before:  # leave finn-plus's scratch folder as it was
            use_finn_build_dir(before)
    rep["build"] = str(build_dir)
    dst = Path(out) if out else build_dir / "report" / "rtl_lint.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(rep, indent=2))
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hw.rtl_check",
                                 description="Verilator lint of every RTL module a FINN build uses.")
    ap.add_argument("build", help="a `make hw` build folder")
    ap.add_argument("--no-ancillary", action="store_true", help="skip the DWCs/FIFOs a bitstream build adds")
    ap.add_argument("--json", help="write the report here (default: BUILD/report/rtl_lint.json)")
    a = ap.parse_args(argv)
    if verilator_version() is None:
        print(f"verilator not found; {INSTALL_HINT}", file=sys.stderr)
        return 2
    rep = lint_build(a.build, ancillary=not a.no_ancillary, out=a.json)
    print(format_report(rep))
    return 1 if rep["status"].get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
