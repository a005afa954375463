"""A Zynq-7000 board in software, behind pynq's Device (test-only: never shipped to boards).

pynq reaches the hardware through one object, its ``Device``: it programs a
bitstream (``download``), maps AXI-lite registers (``mmap`` of /dev/mem),
allocates DMA buffers and flushes or invalidates their caches. This module
replaces only that Device. pynq's own ``Overlay``, ``DefaultIP``, ``MMIO``,
``allocate``/``PynqBuffer`` and ``Clocks`` run unchanged on top of it, and so
does finn-plus-driver on top of pynq.

The hardware behind the fake Device:

* the SLCR (0xF8000000): plain registers holding a Pynq-Z2's PLL setup
  (50 MHz reference, IO PLL x20), which pynq's ``Clocks`` reads and writes;
* one AXI-lite window per IP named in ``<bitfile>.fakehw.json``, the stand-in
  for the ``.hwh`` a real bitfile comes with (the test writes it from the
  build's dataflow partitions):

  - ``idma*``/``odma*``: FINN's IODMA register map (0x00 ap_ctrl: start, done
    (clear on read), idle; 0x10/0x14 buffer address; 0x1C image count);
  - every other IP (``StreamingDataflowPartition_<n>``): a runtime-weight
    memory, zero at power-up; every word written is logged;

* DDR: each ``allocate()`` buffer has a device-side copy. A cacheable buffer
  the driver does not flush before a DMA reads stale bytes, an output it does
  not invalidate keeps stale bytes, as on the board;
* the accelerator: once an input and an output DMA are started, it takes
  ``count`` images from the input buffer and writes one label per image:
  ``(sum of the image's bytes + sum of every word in the weight memories) % classes``.
  The labels therefore depend on the images the driver packed and on the
  weights it wrote over AXI-lite, nothing else.

Everything the driver did is logged in order; ``dump(path)`` writes the log
(``.json`` + ``.npz``) for the test to judge.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from pynq.buffer import PynqBuffer
from pynq.pl_server.device import Device

SLCR_BASE = 0xF8000000
SLCR_RANGE = 0x1000
# Pynq-Z2 boot values: IO_PLL_CTRL (0x108) PLL_FDIV=20 -> 1000 MHz from the 50 MHz PS reference;
# FPGA0_CLK_CTRL (0x170) SRCSEL=IO PLL, DIVISOR0=5, DIVISOR1=4 -> 50 MHz until the overlay sets it.
SLCR_RESET = {0x100: 26 << 12, 0x104: 32 << 12, 0x108: 20 << 12, 0x120: 2 << 8,
              0x170: (4 << 20) | (5 << 8), 0x180: (1 << 20) | (5 << 8),
              0x190: (1 << 20) | (5 << 8), 0x1A0: (1 << 20) | (5 << 8)}
DDR_BASE = 0x16000000  # where the CMA buffers of a PYNQ image start (any value works)
MAX_IDLE_POLLS = 100_000  # a status register polled this often without a transfer in flight: a hang


class FakeHardwareError(RuntimeError):
    """What would hang or fault a real board (a bus error, a DMA that never finishes)."""


class _Window(np.ndarray):
    """What mmap() returns: a uint32 view of a region whose element reads/writes reach the region's
    logic (ints only, as pynq's MMIO.read/write_mm use it); slices and views are plain memory."""

    def __array_finalize__(self, obj):
        self._region = None  # views made from a window (slices, RegisterMap) are plain memory

    def __getitem__(self, key):
        if self._region is not None and isinstance(key, (int, np.integer)):
            return np.uint32(self._region.read(self._word0 + int(key)))
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if self._region is not None and isinstance(key, (int, np.integer)):
            self._region.on_write(self._word0 + int(key), int(np.uint32(value)))


class Region:
    """An AXI-lite slave: base address, size, a word memory."""

    kind = "memory"

    def __init__(self, board, name, base, size):
        self.board, self.name, self.base, self.size = board, name, base, size
        self.mem = np.zeros(size // 4, dtype=np.uint32)

    def window(self, offset, length):
        w = self.mem[offset // 4:(offset + length) // 4].view(_Window)
        w._region, w._word0 = self, offset // 4
        return w

    def read(self, word) -> int:
        return int(self.mem[word])

    def on_write(self, word, value):
        self.board.log_write(self, word, value)


class WeightMemory(Region):
    kind = "weights"


class IODMA(Region):
    """FINN's IODMA (HLS, ap_ctrl_hs): 0x00 control, 0x10/0x14 buffer address, 0x1C number of images."""

    kind = "dma"
    CTRL, ADDR_LO, ADDR_HI, COUNT = 0, 0x10 // 4, 0x14 // 4, 0x1C // 4
    START, DONE, IDLE = 1, 2, 4

    def __init__(self, board, name, base, size, direction):
        super().__init__(board, name, base, size)
        self.direction = direction  # "in": DDR -> accelerator, "out": accelerator -> DDR
        self.mem[self.CTRL] = self.IDLE
        self.pending = None
        self.idle_polls = 0

    def on_write(self, word, value):
        super().on_write(word, value)
        if word == self.CTRL and value & self.START:
            addr = int(self.mem[self.ADDR_LO]) | (int(self.mem[self.ADDR_HI]) << 32)
            self.pending = (addr, int(self.mem[self.COUNT]))
            self.mem[self.CTRL] = self.START  # busy: not idle, not done
            self.board.try_run()

    def read(self, word):
        ctrl = int(self.mem[word])
        if word != self.CTRL:
            return ctrl
        if ctrl & self.DONE:  # ap_done is clear-on-read: this read sees it, the next one does not
            self.mem[word] = ctrl & ~self.DONE
            self.idle_polls = 0
        elif not self.pending:
            self.idle_polls += 1
            if self.idle_polls > MAX_IDLE_POLLS:
                raise FakeHardwareError(f"{self.name}: status polled {self.idle_polls} times, no transfer in flight")
        elif ctrl & self.START:
            self.idle_polls += 1
            if self.idle_polls > MAX_IDLE_POLLS:
                raise FakeHardwareError(f"{self.name}: transfer never finished (its partner DMA was not started)")
        return ctrl

    def finish(self):
        self.pending = None
        self.mem[self.CTRL] = self.IDLE | self.DONE


class Buffer:
    """A DMA buffer: the host's (cached) view is the PynqBuffer; ``ddr`` is what the DMA sees."""

    def __init__(self, address, nbytes, host, cacheable):
        self.address, self.nbytes, self.host, self.cacheable = address, nbytes, host, cacheable
        self.ddr = bytearray(nbytes)

    def host_bytes(self):
        return self.host.reshape(-1).view(np.uint8)


class FakeZynqBoard(Device):
    """pynq Device of a Zynq-7000 (Pynq-Z2) board with the hardware described above."""

    def __init__(self, record: str | None = None):
        super().__init__("fake_zynq0")
        self.name = "fake-pynq-z2"
        self.arch = "armv7l"  # pynq's ZYNQ_ARCH: Clocks use the Zynq-7000 SLCR
        self.capabilities = {"REGISTER_RW": False, "MEMORY_MAPPED": True, "CALLABLE": False}
        self.timestamp = ""
        self.bitfile_name = None
        self.record = record
        self.events: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self._burst = None
        self.regions: list[Region] = [Region(self, "slcr", SLCR_BASE, SLCR_RANGE)]
        for off, val in SLCR_RESET.items():
            self.regions[0].mem[off // 4] = val
        self.buffers: dict[int, Buffer] = {}
        self._next_addr = DDR_BASE
        self.hw = None

    # --- the log
    def event(self, kind, **kw):
        self._burst = None
        self.events.append({"i": len(self.events), "kind": kind, **kw})
        return self.events[-1]

    def log_write(self, region, word, value):
        b = self._burst
        if b is not None and b["region"] == region.name and word == b["word"] + len(b["_values"]):
            b["_values"].append(value)
            return
        b = self.event("write", region=region.name, region_kind=region.kind, word=word)
        b["_values"] = [value]
        self._burst = b

    def dump(self, path: str | os.PathLike | None = None):
        path = Path(path or self.record)
        events = []
        for e in self.events:
            e = dict(e)
            if "_values" in e:
                vals = np.asarray(e.pop("_values"), dtype=np.uint32)
                e["n"] = len(vals)
                self.arrays[f"w{e['i']}"] = vals
            events.append(e)
        mem = {f"mem:{r.name}": r.mem for r in self.regions if r.kind in ("weights", "memory")}
        np.savez(path.with_suffix(".npz"), **self.arrays, **mem)
        path.with_suffix(".json").write_text(json.dumps({"events": events, "hw": self.hw}, indent=1))

    # --- programming the PL
    def get_bitfile_metadata(self, bitfile_name):
        desc = Path(os.path.splitext(bitfile_name)[0] + ".fakehw.json")
        if not desc.exists():
            raise RuntimeError(f"fake board: no hardware description {desc.name} next to the bitfile")
        hw = json.loads(desc.read_text())
        return _Parser(hw)

    def download(self, bitstream, parser=None):
        data = Path(bitstream.bitfile_name).read_bytes()
        self.hw = parser.hw
        self.regions = self.regions[:1]
        for name, ip in parser.hw["ip"].items():
            if ip["kind"] == "dma":
                self.regions.append(IODMA(self, name, ip["phys_addr"], ip["addr_range"], ip["direction"]))
            else:
                self.regions.append(WeightMemory(self, name, ip["phys_addr"], ip["addr_range"]))
        self.event("download", bitfile=Path(bitstream.bitfile_name).name, sha256=hashlib.sha256(data).hexdigest())
        self.post_download(bitstream, parser, self.name)

    # --- AXI-lite
    def mmap(self, base_addr, length):
        for r in self.regions:
            if r.base <= base_addr and base_addr + length <= r.base + r.size:
                return r.window(base_addr - r.base, length)
        raise FakeHardwareError(f"bus error: nothing mapped at {base_addr:#x} (+{length:#x})")

    # --- DDR
    @property
    def default_memory(self):
        return self

    def allocate(self, shape, dtype, cacheable=True, **kwargs):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        addr = self._next_addr
        self._next_addr += (nbytes + 0xFFF) & ~0xFFF  # page aligned, never reused
        host = PynqBuffer(shape, dtype, device=self, device_address=addr, bo=addr, coherent=not cacheable)
        host[...] = 0
        self.buffers[addr] = Buffer(addr, nbytes, host, bool(cacheable))
        self.event("allocate", address=addr, nbytes=nbytes, cacheable=bool(cacheable))
        return host

    def flush(self, bo, offset, vaddr, nbytes):
        b = self.buffers[bo]
        b.ddr[offset:offset + nbytes] = b.host_bytes()[offset:offset + nbytes].tobytes()

    def invalidate(self, bo, offset, vaddr, nbytes):
        b = self.buffers[bo]
        b.host_bytes()[offset:offset + nbytes] = np.frombuffer(bytes(b.ddr[offset:offset + nbytes]), np.uint8)

    def _ddr(self, addr, nbytes):
        for b in self.buffers.values():
            if b.address <= addr and addr + nbytes <= b.address + b.nbytes:
                return b, addr - b.address
        raise FakeHardwareError(f"DMA to unallocated memory {addr:#x} (+{nbytes})")

    def read_ddr(self, addr, nbytes) -> bytes:
        b, off = self._ddr(addr, nbytes)
        src = b.ddr if b.cacheable else b.host_bytes().tobytes()
        return bytes(src[off:off + nbytes])

    def write_ddr(self, addr, data: bytes):
        b, off = self._ddr(addr, len(data))
        if b.cacheable:
            b.ddr[off:off + len(data)] = data
        else:
            b.host_bytes()[off:off + len(data)] = np.frombuffer(data, np.uint8)

    # --- the accelerator
    def try_run(self):
        dmas = [r for r in self.regions if isinstance(r, IODMA)]
        ins = [d for d in dmas if d.direction == "in"]
        outs = [d for d in dmas if d.direction == "out"]
        if not all(d.pending for d in ins + outs):
            return
        acc = self.hw["accelerator"]
        (iaddr, n), (oaddr, m) = ins[0].pending, outs[0].pending
        if n != m:
            raise FakeHardwareError(f"input DMA {n} images, output DMA {m}: the stream would stall")
        x = self.read_ddr(iaddr, n * acc["in_bytes"])
        wsum = self.weight_sum()
        per = np.frombuffer(x, np.uint8).reshape(n, acc["in_bytes"]).sum(1, dtype=np.int64)
        labels = ((per + wsum) % acc["classes"]).astype(np.int64)
        out = np.zeros((n, acc["out_bytes"]), np.uint8)
        out[:, 0] = labels
        self.write_ddr(oaddr, out.tobytes())
        e = self.event("run", images=n, weight_sum=int(wsum), labels=labels.tolist())
        self.arrays[f"in{e['i']}"] = np.frombuffer(x, np.uint8).copy()
        for d in ins + outs:
            d.finish()

    def weight_sum(self) -> int:
        return int(sum(int(r.mem.sum(dtype=np.uint64)) for r in self.regions if r.kind == "weights"))

    # --- fault injection (the test's negative checks)
    def stick(self, region: str, word: int, value: int):
        """A stuck memory word: writes to it are logged but it keeps ``value`` (read-back differs)."""
        r = next(r for r in self.regions if r.name == region)
        orig = r.on_write

        def on_write(w, v, _orig=orig):
            _orig(w, v)
            if w == word:
                r.mem[w] = value
        r.on_write = on_write


class _Parser:
    """What pynq's HWH parser gives an Overlay, built from the fake hardware description."""

    def __init__(self, hw):
        self.hw = hw
        self.ip_dict = {
            name: {"fullpath": name, "type": ip["type"], "bdtype": None, "state": None,
                   "addr_range": ip["addr_range"], "phys_addr": ip["phys_addr"], "mem_id": "s_axi_control",
                   "memtype": "REGISTER", "gpio": {}, "interrupts": {}, "parameters": {}}
            for name, ip in hw["ip"].items()}
        self.mem_dict = {}
        self.gpio_dict = {}
        self.interrupt_controllers = {}
        self.interrupt_pins = {}
        self.hierarchy_dict = {}
        self.systemgraph = None  # pynqmetadata's model of a real .hwh: nothing here reads it
        # PS7 FCLK0 as FINN's Zynq shell sets it (100 MHz: IO PLL 1000 MHz / 10 / 1)
        self.clock_dict = {0: {"enable": 1, "divisor0": 10, "divisor1": 1},
                           1: {"enable": 0, "divisor0": 10, "divisor1": 1}}


_board: FakeZynqBoard | None = None


def install(record: str | None = None) -> FakeZynqBoard:
    """Make the fake board pynq's active device (before anything opens an Overlay)."""
    global _board
    if _board is None:
        _board = FakeZynqBoard(record)
        Device.active_device = _board
        if record:
            atexit.register(_board.dump)
    return _board


def board() -> FakeZynqBoard:
    if _board is None:
        raise RuntimeError("fake_zynq.install() was not called")
    return _board
