"""Per-layer folding choice at a cycle target: the cheapest PE x SIMD that meets it.

finn-plus's ``SetFolding`` grows a matrix layer's SIMD first (up to the weight-stream cap),
then its PE, and stops at the first value that meets the target: with the cap it often
lands well below the target (e.g. SIMD 36 x PE 32 where SIMD 32 x PE 32 also meets it) and
pays LUTs and BRAM for the overshoot. :func:`cheapest_mvau_folding` revisits each MVAU/VVAU
after ``SetFolding``: among all (PE, SIMD) that divide the layer's dimensions, respect the
weight-stream cap and meet the target cycles, it takes the one with the smallest budget
share by finn-plus's own per-layer estimate (LUT, BRAM, DSP and URAM, each divided by what
the budget allows of it), fewer multipliers on a tie.
"""

from __future__ import annotations

import math

from export.finn_env import prepare

prepare()

from finn.util.basic import getHWCustomOp  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402

RES = ("LUT", "BRAM_18K", "DSP", "URAM")

#: finn-plus's widest HLS integer (ap_int) - a weight stream of an HLS MVAU may not be wider.
MAX_AP_INT_W = 8191


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, int(n) + 1) if n % d == 0]


def cost(res: dict, limits: dict) -> float:
    """A layer's share of the budget: sum over resources of estimate / allowed amount."""
    total = 0.0
    for k in RES:
        v = float(res.get(k, 0.0))
        lim = limits.get(k, 0.0)
        total += v / lim if lim > 0 else (math.inf if v > 0 else 0.0)
    return total


def cheapest_mvau_folding(model: ModelWrapper, part: str, target_cycles: int, wwidth_max: int,
                          limits: dict) -> list[tuple[str, int, int]]:
    """Re-choose PE and SIMD of every MVAU/VVAU of ``model`` (in place): the cheapest pair that meets
    ``target_cycles`` (or the fastest if none does). Returns (layer, PE, SIMD) of the layers changed."""
    changed = []
    for node in model.graph.node:
        op = node.op_type
        if not (op.startswith("MVAU") or op.startswith("VVAU")):
            continue
        inst = getHWCustomOp(node)
        pe0, simd0 = inst.get_nodeattr("PE"), inst.get_nodeattr("SIMD")
        if op.startswith("MVAU"):
            max_pe, max_simd = inst.get_nodeattr("MH"), inst.get_nodeattr("MW")
        else:
            max_pe = inst.get_nodeattr("Channels")
            max_simd = int(math.prod(inst.get_nodeattr("Kernel")))
        wbits = inst.get_input_datatype(1).bitwidth()
        decoupled = "mem_mode" in inst.get_nodeattr_types() and inst.get_nodeattr("mem_mode") == "internal_decoupled"
        best = None
        fastest = None
        for pe in _divisors(max_pe):
            for simd in _divisors(max_simd):
                if simd * wbits > wwidth_max and simd != 1:
                    continue
                if decoupled and op.endswith("_hls") and pe * simd * wbits > MAX_AP_INT_W:
                    continue
                inst.set_nodeattr("PE", pe)
                inst.set_nodeattr("SIMD", simd)
                cyc = inst.get_exp_cycles()
                if fastest is None or cyc < fastest[0]:
                    fastest = (cyc, pe, simd)
                if cyc > target_cycles:
                    continue
                try:
                    c = cost(inst.node_res_estimation(part), limits)
                except Exception:  # noqa: BLE001 - a combination finn cannot estimate: skip it
                    continue
                key = (c, pe * simd, pe)
                if best is None or key < best[0]:
                    best = (key, pe, simd)
        _, pe, simd = best if best is not None else (None, fastest[1], fastest[2])
        inst.set_nodeattr("PE", pe)
        inst.set_nodeattr("SIMD", simd)
        if (pe, simd) != (pe0, simd0):
            changed.append((node.name, pe, simd))
    return changed
