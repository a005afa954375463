"""The resource budget of a build: every part of the accelerator and its shell, line by line.

The budget is taken on the graph as the bitstream flow will build it, not on the
bare folded model: :func:`prepare_for_budget` applies, to a copy, what finn-plus
adds after folding - data-width converters (``InsertDWC``), a FIFO on every
stream (``InsertFIFO(create_shallow_fifos=True)``: the depths of finn-plus's
``force_minimal_fifos`` strategy; shortcut FIFOs of residual blocks are
deepened by :func:`deepen_branch_fifos`), the two DMAs (``InsertIODMA``) - and
specializes the new nodes. Then :func:`budget` counts, per part:

* **finn-plus's estimates** (``node_res_estimation``) of every node that has
  one: compute layers, sliding windows, thresholds, width converters, FIFOs;
* **stated per-instance figures** where finn-plus has no model (it estimates
  0 LUT): the DMAs, and every other layer finn-plus gives 0 LUT (Pool,
  LabelSelect, stream duplication, ...) - see :data:`STATED`;
* the **shell** (AXI interconnect, SmartConnect, reset, PS glue: a published
  figure) and, for each runtime-writable layer, its **AXI-lite path** (finn-rtllib
  ``axilite.sv`` and one interconnect master port: counted from the RTL,
  :func:`axilite_luts`).

Every stated figure carries its source in :data:`STATED`. The published
post-synthesis report they come from is stored beside this module
(``hw/data/pynqz2_finn_post_synth_resources.json``); tests/test_hw.py derives the
figures from it again.

Not estimated: flip-flops (finn-plus has no FF model; the stated parts list
theirs); FIFO depths that simulation-based sizing (Vivado) may choose; routing.
docs/hardware.md says what an estimate can and cannot promise.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from dataclasses import asdict, dataclass, field

from export.finn_env import prepare

prepare()

from finn.transformation.fpgadataflow.insert_dwc import InsertDWC  # noqa: E402
from finn.transformation.fpgadataflow.insert_fifo import InsertFIFO  # noqa: E402
from finn.transformation.fpgadataflow.insert_iodma import InsertIODMA  # noqa: E402
from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers  # noqa: E402
from finn.util.basic import getHWCustomOp  # noqa: E402
from finn.util.fpgadataflow import is_hls_node, is_rtl_node  # noqa: E402
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive  # noqa: E402
from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames  # noqa: E402
from qonnx.transformation.infer_data_layouts import InferDataLayouts  # noqa: E402

RES = ("LUT", "BRAM_18K", "DSP", "URAM")

#: Where the stated figures come from: a FINN Zynq build for the Pynq-Z2 (xc7z020), FINN v0.9/v0.10
#: dev, Vivado/Vitis HLS 2022.1, post-synthesis hierarchical utilization as FINN's own
#: ``post_synth_res`` analysis writes it, published in a public repository. Its accelerator had
#: ``runtime_writeable_weights=0``: the AXI-lite interconnect served the two DMAs only.
REPORT = {
    "url": "https://github.com/Ba1tu3han/Finn_Thesis/blob/89b4c46b2b4eda3068f021c808cfe9fa4dfa8e2a/post_synth_resources.json",
    "repo": "Ba1tu3han/Finn_Thesis",
    "commit": "89b4c46b2b4eda3068f021c808cfe9fa4dfa8e2a",
    "file": "hw/data/pynqz2_finn_post_synth_resources.json",
    "board": "Pynq-Z2 (xc7z020), FINN 0.9/0.10 dev, Vivado 2022.1 (the repository's README)",
}


@dataclass(frozen=True)
class Stated:
    """A per-instance figure for a part finn-plus does not estimate."""

    LUT: int
    BRAM_18K: int = 0
    DSP: int = 0
    FF: int = 0
    source: str = ""
    kind: str = "published"  # "published": read off the report; "stand-in": a figure of a similar part


#: The stated figures (per instance). See :data:`REPORT` for the report they are read from.
STATED: dict[str, Stated] = {
    # "(top)" minus the sum of every FINN instance in the report (LUT 19,486 - 15,148; FF 25,482 - 20,103):
    # what the Zynq shell FINN builds around the accelerator costs - AXI interconnect (PS GP0 -> 2
    # AXI-lite slaves), SmartConnect (2 DMA masters -> PS HP0), proc_sys_reset, PS7 wrapper logic.
    "shell": Stated(4338, 0, 0, 5379, "report: (top) minus all FINN instances", "published"),
    # The report's two IODMA_hls instances (64-bit AXI master + AXI-lite control each).
    "idma": Stated(1044, 2, 0, 1617, "report: StreamingDataflowPartition_0_IODMA_hls_0 (1 RAMB36)", "published"),
    "odma": Stated(1214, 1, 0, 1765, "report: StreamingDataflowPartition_2_IODMA_hls_0 (1 RAMB18)", "published"),
    # Layers finn-plus gives 0 LUT (Pool_hls, LabelSelect_hls, DuplicateStreams, ...): the largest
    # LUT figure of a FINN stream-helper layer in the report, StreamingMaxPool_hls_1 (450 LUT; its 4
    # RAMB36 line buffer is not added: finn-plus's own memory estimate of the node is kept).
    "no_lut_model": Stated(450, 0, 0, 953, "report: StreamingMaxPool_hls_1 (stand-in for any layer "
                           "finn-plus estimates at 0 LUT)", "stand-in"),
}

#: The AXI-lite side of a runtime-writable layer: finn-rtllib's ``axilite.sv`` adapter (inside
#: memstream_axi.sv for MVAU weights, thresholding_axi.sv for thresholds) and the master port of the
#: AXI interconnect it hangs on. No published figure was found; the figure is counted from the RTL
#: (see :func:`axilite_luts`): a first-principles count, not a synthesis result.
AXILITE_SOURCE = ("counted from finn-rtllib/axi/hdl/axilite.sv (W:32 read multiplexer, word-select "
                  "decoder, address/handshake logic) plus one AXI-lite crossbar master port (34-bit read "
                  "data/response multiplexer input, address decode, handshake); not synthesized")


def axilite_luts(width: int, addr_width: int) -> tuple[int, int]:
    """(LUTs, FFs) of one runtime-writable layer's AXI-lite path, counted from the RTL.

    finn-rtllib/axi/hdl/axilite.sv with IP_DATA_WIDTH = ``width``: FOLD = ceil(W/32) 32-bit words.

    * read path: ``IpRData[sel]``, a 32-bit FOLD:1 multiplexer: 32 * ceil(FOLD/4) LUT6 (a LUT6 is a
      4:1 multiplexer; wider ones chain through MUXF7/MUXF8), none for FOLD = 1;
    * write path: FOLD word enables from the word-select decoder (one LUT each for FOLD > 1); the
      W-bit write buffer is flip-flops with clock enable;
    * the address multiplexer (``snk_addr``, one LUT per address bit) and ~30 LUTs of handshake /
      valid logic (RAddr/WAddr/WData capture, WIssued, RData, IpEn, IpRAck);
    * the AXI interconnect's master port for this slave (shared-access crossbar, PG059's SASD): its
      share of the 34-bit read data/response multiplexer (34/4 LUT6), address decode (4) and
      handshake routing (4): 17 LUTs.

    Flip-flops: the write and read word buffers (2 * 32 * FOLD) plus 2 * address width + 16."""
    fold = max(1, math.ceil(width / 32))
    luts = 30 + addr_width + (32 * math.ceil(fold / 4) + fold if fold > 1 else 0) + 17
    ffs = 2 * 32 * fold + 2 * addr_width + 16
    return luts, ffs


def bitstream_graph(model: ModelWrapper, part: str, axi_port_width: int) -> ModelWrapper:
    """A copy of the folded model with what finn-plus adds before ``ZynqBuild``'s partitioning:
    width converters and FIFOs as ``step_set_fifo_depths`` inserts them (minimal depths), then
    ``ZynqBuild``'s IODMAs and width converters, each followed by finn's renaming. The budget and
    the driver (hw/build.py) are made from this graph, so their layer names are the bitstream's."""
    m = ModelWrapper(copy.deepcopy(model.model))
    m = m.transform(InferDataLayouts())
    for t in (InsertDWC(), InsertFIFO(create_shallow_fifos=True), SpecializeLayers(part)):
        m = m.transform(t)
    m = m.transform(GiveUniqueNodeNamesRecursive())
    m = m.transform(GiveReadableTensorNames())
    for t in (InsertIODMA(axi_port_width), InsertDWC(), SpecializeLayers(part)):
        m = m.transform(t)
        m = m.transform(GiveUniqueNodeNames())
        m = m.transform(GiveReadableTensorNames())
    return m


def prepare_for_budget(model: ModelWrapper, part: str, axi_port_width: int,
                       branch_fifos: bool = True, uram: bool = False) -> ModelWrapper:
    """:func:`bitstream_graph`, with the FIFOs of residual shortcuts deepened (:func:`deepen_branch_fifos`;
    in block RAM on parts without UltraRAM, ``uram=False``)."""
    m = bitstream_graph(model, part, axi_port_width)
    if branch_fifos:
        deepen_branch_fifos(m, uram=uram)
    return m


def _op(node) -> str:
    return node.op_type.rsplit("_", 1)[0] if (is_hls_node(node) or is_rtl_node(node)) else node.op_type


def deepen_branch_fifos(model: ModelWrapper, uram: bool = False) -> list[dict]:
    """Size the FIFO on the shorter branch of every fork/join pair (residual shortcut).

    The shortcut must buffer what the fork emits while the longer branch fills: depth = stream words
    the fork produces during the difference of the two branches' latencies (finn-plus's cycle
    estimates, summed along each branch), at most one frame. A fedfinn estimate; simulation-based
    FIFO sizing (Vivado) decides the real depths. A deep FIFO goes to block RAM unless the part has
    UltraRAM (``uram``), as finn-plus's ``large_fifo_mem_style`` would pin it. Returns what was changed."""
    changed = []
    for fork in model.graph.node:
        cons = model.find_consumers(fork.output[0]) or []
        outs = [o for o in fork.output]
        branches = []
        if len(outs) >= 2:
            branches = [(o, model.find_consumers(o) or []) for o in outs]
        elif len(cons) >= 2:
            branches = [(fork.output[0], [c]) for c in cons]
        if len(branches) != 2:
            continue
        paths = []
        for _, first in branches:
            if len(first) != 1:
                break
            node, lat, path = first[0], 0, []
            while node is not None and _op(node) not in ("ElementwiseAdd", "AddStreams"):
                path.append(node)
                if not node.op_type.startswith("StreamingFIFO"):
                    lat += int(getHWCustomOp(node).get_exp_cycles())
                nxt = model.find_consumers(node.output[0]) or []
                node = nxt[0] if len(nxt) == 1 else None
            if node is None:
                break
            paths.append((lat, path, node))
        if len(paths) != 2 or paths[0][2] is not paths[1][2]:
            continue
        (la, pa, _), (lb, pb, _) = paths
        short = pa if la <= lb else pb
        fifos = [n for n in short if n.op_type.startswith("StreamingFIFO")]
        if not fifos:
            continue
        inst = getHWCustomOp(fork)
        words = int(math.prod(inst.get_folded_output_shape()[:-1]))
        cyc_per_word = max(1.0, inst.get_exp_cycles() / max(1, words))
        depth = min(words, max(2, math.ceil(abs(la - lb) / cyc_per_word)))
        fifo = getHWCustomOp(fifos[-1])
        depth = 2 ** math.ceil(math.log2(max(2, depth)))
        fifo.set_nodeattr("depth", int(depth))
        if not uram and "ram_style" in fifo.get_nodeattr_types() and fifo.resolve_ram_style() == "ultra":
            fifo.set_nodeattr("ram_style", "block")
        changed.append({"fifo": fifos[-1].name, "depth": int(depth), "latency_difference_cycles": abs(la - lb)})
    return changed


@dataclass
class Line:
    part: str
    count: int
    LUT: float = 0.0
    BRAM_18K: float = 0.0
    DSP: float = 0.0
    URAM: float = 0.0
    FF: float = 0.0
    source: str = ""
    members: list[str] = field(default_factory=list)

    def add(self, res: dict) -> None:
        for k in RES + ("FF",):
            setattr(self, k, getattr(self, k) + float(res.get(k, 0.0)))


def _axilite_widths(inst, model: ModelWrapper) -> tuple[int, int]:
    """(IP data width, AXI-lite address width) of a runtime-writable layer's adapter: the memory word
    for MVAU/VVAU weights (memstream_axi.sv: PE * SIMD * weight bits), one threshold for
    Thresholding (thresholding_axi.sv: IP_DATA_WIDTH = WT)."""
    op = inst.onnx_node.op_type
    wbits = DataType[inst.get_nodeattr("weightDataType")].bitwidth()
    n = int(np.prod(model.get_tensor_shape(inst.onnx_node.input[1])))
    if op.startswith("MVAU") or op.startswith("VVAU"):
        width = int(inst.get_nodeattr("PE") * inst.get_nodeattr("SIMD") * wbits)
    else:
        width = int(wbits)
    words = max(2, math.ceil(n * wbits / width) * math.ceil(width / 32))
    return width, math.ceil(math.log2(words)) + 2


def budget(prepared: ModelWrapper, part: str, capacity: dict, usable: dict) -> dict:
    """Count every part of ``prepared`` (a :func:`prepare_for_budget` model) plus the shell."""
    groups = {
        "compute layers (finn-plus)": Line("compute layers (finn-plus)", 0, source="finn-plus res_estimation"),
        "width converters (finn-plus)": Line("width converters (finn-plus)", 0, source="finn-plus res_estimation"),
        "FIFOs (finn-plus)": Line("FIFOs (finn-plus)", 0,
                                  source="finn-plus res_estimation at minimal depth (force_minimal_fifos); "
                                  "residual shortcuts sized by deepen_branch_fifos"),
        "layers without a LUT model": Line("layers without a LUT model", 0,
                                           source=STATED["no_lut_model"].source + " [stated: stand-in]"),
        "DMAs": Line("DMAs", 0, source="report: IODMA_hls post-synthesis [stated: published]"),
        "AXI-lite adapters of runtime-writable layers": Line(
            "AXI-lite adapters of runtime-writable layers", 0, source=AXILITE_SOURCE + " [stated: counted]"),
        "shell": Line("shell", 1, source=STATED["shell"].source + " [stated: published]"),
    }
    groups["shell"].add(asdict(STATED["shell"]))
    nodes = [n for n in prepared.graph.node if is_hls_node(n) or is_rtl_node(n)]
    for i, n in enumerate(nodes):
        inst = getHWCustomOp(n)
        est = inst.node_res_estimation(part)
        op = _op(n)
        if op == "IODMA":
            first = prepared.find_producer(n.input[0]) is None
            st = STATED["idma" if first else "odma"]
            g = groups["DMAs"]
            g.add(asdict(st))
        elif op == "StreamingDataWidthConverter":
            g = groups["width converters (finn-plus)"]
            g.add(est)
        elif op == "StreamingFIFO":
            g = groups["FIFOs (finn-plus)"]
            g.add(est)
        elif float(est.get("LUT", 0)) == 0.0:
            g = groups["layers without a LUT model"]
            g.add({**est, "LUT": STATED["no_lut_model"].LUT, "FF": STATED["no_lut_model"].FF})
        else:
            g = groups["compute layers (finn-plus)"]
            g.add(est)
        g.count += 1
        g.members.append(n.name)
        attrs = inst.get_nodeattr_types()
        if "runtime_writeable_weights" in attrs and inst.get_nodeattr("runtime_writeable_weights") == 1:
            w, aw = _axilite_widths(inst, prepared)
            luts, ffs = axilite_luts(w, aw)
            a = groups["AXI-lite adapters of runtime-writable layers"]
            a.add({"LUT": luts, "FF": ffs})
            a.count += 1
            a.members.append(f"{n.name} (W={w})")
    lines = [g for g in groups.values() if g.count]
    total = {k: sum(getattr(g, k) for g in lines) for k in RES + ("FF",)}
    util = {k: (total[k] / capacity[k] if capacity.get(k) else (0.0 if total[k] == 0 else math.inf)) for k in RES}
    fits = all(util[k] <= usable.get(k, 1.0) for k in RES)
    return {
        "lines": [asdict(g) for g in lines],
        "total": total,
        "utilization": util,
        "usable": {k: usable.get(k, 1.0) for k in RES},
        "capacity": {k: capacity[k] for k in RES + ("FF",) if k in capacity},
        "fits": fits,
        "report_source": REPORT,
        "not_counted": [
            "flip-flops are not checked (finn-plus has no FF model; the FF column holds the stated parts only)",
            "FIFO depths beyond the minimal ones, which simulation-based FIFO sizing (Vivado) may choose",
            "nested AXI interconnects FINN adds beyond 64 AXI-lite slaves",
            "routing and timing closure",
        ],
    }


def budget_table(b: dict) -> list[str]:
    """The budget as text lines (``make hw`` prints them)."""
    cap = b["capacity"]
    out = [f"{'part':46s} {'n':>3s} {'LUT':>8s} {'BRAM18':>7s} {'DSP':>5s}  source"]
    for g in b["lines"]:
        out.append(f"{g['part']:46s} {g['count']:3d} {g['LUT']:8,.0f} {g['BRAM_18K']:7,.1f} {g['DSP']:5,.0f}  "
                   f"{g['source']}")
    t, u, lim = b["total"], b["utilization"], b["usable"]
    out.append(f"{'total':46s} {'':3s} {t['LUT']:8,.0f} {t['BRAM_18K']:7,.1f} {t['DSP']:5,.0f}")
    out.append(f"{'capacity':46s} {'':3s} {cap['LUT']:8,d} {cap['BRAM_18K']:7,d} {cap['DSP']:5,d}")
    out.append(f"{'utilization':46s} {'':3s} {100 * u['LUT']:7.1f}% {100 * u['BRAM_18K']:6.1f}% "
               f"{100 * u['DSP']:4.1f}%")
    out.append(f"{'budget (usable share)':46s} {'':3s} {100 * lim['LUT']:7.0f}% {100 * lim['BRAM_18K']:6.0f}% "
               f"{100 * lim['DSP']:4.0f}%   fits: {'yes' if b['fits'] else 'NO'}")
    return out
