"""Boards the hardware flow targets: FPGA part, default clock, fabric capacity.

Parts and AXI port widths come from finn-plus's own tables
(``finn.util.basic.pynq_part_map`` / ``pynq_native_port_width``), checked here
against them in :func:`check_against_finn`. Capacities are the device totals
from the AMD data sheets (DS190 Zynq-7000, DS891 Zynq UltraScale+): LUTs,
flip-flops, 36 Kb block RAMs, DSP slices, UltraRAMs. :data:`USABLE` is the share
of each resource the whole design may take in the fit check - accelerator, width
converters, FIFOs, DMAs, AXI-lite adapters and shell all counted (hw/budget.py).

The default clock is the accelerator clock the flow estimates at and
synthesizes for: 100 MHz on the Zynq-7000 boards (BNN-PYNQ's and FINN's
Pynq-Z1/Z2 clock), 200 MHz on the Zynq UltraScale+ boards. ``--clock-mhz``
overrides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Board:
    name: str
    part: str
    clock_mhz: float
    lut: int
    ff: int
    bram36: int
    dsp: int
    uram: int
    family: str  # "zynq7" or "zynquplus"
    axi_port_width: int  # bits, the DMA data width FINN uses for the board

    @property
    def bram18(self) -> int:  # FINN's estimates count 18 Kb halves
        return 2 * self.bram36

    def capacity(self) -> dict[str, int]:
        """Capacity in the units of FINN's resource estimates."""
        return {"LUT": self.lut, "FF": self.ff, "BRAM_18K": self.bram18, "DSP": self.dsp, "URAM": self.uram}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bram18"] = self.bram18
        return d


#: Share of each resource the whole design may use, everything counted (hw/budget.py): 70% of
#: LUTs and block RAMs leaves head-room for routing and for what an estimate misses (deeper FIFOs
#: after simulation-based sizing, synthesis differences); DSPs and URAMs are hard blocks without
#: routing pressure. Same budget on every board. Flip-flops are not checked (no FINN model).
USABLE = {"LUT": 0.70, "BRAM_18K": 0.70, "DSP": 0.90, "URAM": 0.90}

_Z7020 = dict(part="xc7z020clg400-1", lut=53_200, ff=106_400, bram36=140, dsp=220, uram=0, family="zynq7")
_ZU3EG = dict(lut=70_560, ff=141_120, bram36=216, dsp=360, uram=0, family="zynquplus")
_ZU28DR = dict(lut=425_280, ff=850_560, bram36=1_080, dsp=4_272, uram=80, family="zynquplus")

BOARDS: dict[str, Board] = {
    b.name: b
    for b in [
        Board("Pynq-Z1", clock_mhz=100.0, axi_port_width=64, **_Z7020),
        Board("Pynq-Z2", clock_mhz=100.0, axi_port_width=64, **_Z7020),
        Board("Ultra96", part="xczu3eg-sbva484-1-e", clock_mhz=200.0, axi_port_width=128, **_ZU3EG),
        Board("Ultra96-V2", part="xczu3eg-sbva484-1-i", clock_mhz=200.0, axi_port_width=128, **_ZU3EG),
        Board("AUP-ZU3_8GB", part="xczu3eg-sfvc784-2-e", clock_mhz=200.0, axi_port_width=128, **_ZU3EG),
        Board(
            "ZCU104", part="xczu7ev-ffvc1156-2-e", clock_mhz=200.0, axi_port_width=128,
            lut=230_400, ff=460_800, bram36=312, dsp=1_728, uram=96, family="zynquplus",
        ),
        Board(
            "ZCU102", part="xczu9eg-ffvb1156-2-e", clock_mhz=200.0, axi_port_width=128,
            lut=274_080, ff=548_160, bram36=912, dsp=2_520, uram=0, family="zynquplus",
        ),
        Board(
            "KV260_SOM", part="xck26-sfvc784-2LV-c", clock_mhz=200.0, axi_port_width=128,
            lut=117_120, ff=234_240, bram36=144, dsp=1_248, uram=64, family="zynquplus",
        ),
        Board("ZCU111", part="xczu28dr-ffvg1517-2-e", clock_mhz=200.0, axi_port_width=128, **_ZU28DR),
        Board("RFSoC2x2", part="xczu28dr-ffvg1517-2-e", clock_mhz=200.0, axi_port_width=128, **_ZU28DR),
        Board("RFSoC4x2", part="xczu48dr-ffvg1517-2-e", clock_mhz=200.0, axi_port_width=128, **_ZU28DR),
    ]
}


def get_board(name: str) -> Board:
    for key, b in BOARDS.items():
        if key.lower() == name.lower():
            return b
    raise ValueError(f"unknown board {name!r}; known: {', '.join(BOARDS)}")


def check_against_finn() -> list[str]:
    """Differences between this table and finn-plus's part / port-width maps."""
    from finn.util.basic import pynq_native_port_width, pynq_part_map

    diffs = []
    for b in BOARDS.values():
        if pynq_part_map.get(b.name) != b.part:
            diffs.append(f"{b.name}: part {b.part} here, {pynq_part_map.get(b.name)} in finn")
        if pynq_native_port_width.get(b.name) != b.axi_port_width:
            diffs.append(f"{b.name}: port width {b.axi_port_width} here, {pynq_native_port_width.get(b.name)} in finn")
    return diffs
