"""What answers the agent's requests: the accelerator on a board, or an emulator on the host.

A backend is the seam between the protocol (:mod:`client_pynq.agent`) and
what computes: it takes the runtime weights of a round and turns a batch of
images (already in the accelerator's input format) into class indices.

* :class:`BoardBackend` (``serve --deploy DIR``): a PYNQ board. Loads the
  bitfile and ``settings.json`` of a FINN deployment package with
  ``finn-plus-driver`` (imported here, lazily: pynq exists only on the board),
  writes each round's ``.dat`` files with ``load_runtime_weights`` (AXI-lite,
  read back and verified by the driver) and runs batches with ``execute``.
  Power: the board's rails through ``pynq.get_rails()``, where it has any.
* :class:`BitExactEmulator` (``serve --emulate BUILD``): the folded dataflow
  model of a ``fedfinn hw build`` folder, executed bit-exactly
  (:mod:`client_pynq.dataflow`). It takes the same ``.dat`` files the board
  takes and decodes them into the model (with the layout the build measured),
  so the weight files are what is emulated, not a model on the side. FINN's
  own per-image execution, the slow reference, is ``fedfinn hw emulate``.
* :class:`FastEmulator` (``serve --emulate BUILD --mode fast``): the build's
  own input-stage model (``step_preprocess_io``: uint8 NHWC -> normalized NCHW,
  the network, TopK), converted once at start into a plain ONNX graph
  (quantizers as Div/Add/Clip/Round/Sub/Mul, :mod:`client_pynq.fastonnx`) and
  run by onnxruntime on whole batches. A round sends only new parameter values
  (``values``: named float32 arrays, checked against the build's names and
  shapes before anything runs), never a graph. Labelled "fast (onnxruntime),
  not bit-exact to the accelerator": float rounding at quantizer boundaries
  can differ from the integer datapath.
* :class:`SyntheticBackend` (``serve --synthetic``): numpy only, no model; a
  deterministic stand-in for protocol tests and for checking an install.

The board and synthetic backends need only numpy + the standard library;
the emulators need onnx/qonnx/onnxruntime (imported here only when an
emulator is asked for), never finn or the rest of the project.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .buildfiles import parse_dat
from .protocol import safe_file_name

FAST_LABEL = "fast (onnxruntime), not bit-exact to the accelerator"
BITEXACT_LABEL = "emulated: bit-exact execution of the FINN dataflow model"


class BackendError(Exception):
    """A request the backend refuses (code = protocol error code)."""

    def __init__(self, code: str, message: str, partial: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial = partial  # a weight update failed half-way: the accelerator's weights are unknown


class Backend:
    """Interface. Subclasses set the attributes and implement the three methods."""

    kind = "abstract"  # board | emulate-bitexact | emulate-fast | synthetic
    mode = ""  # human-readable label, sent with every result
    bit_exact = False  # results equal the accelerator's, image for image
    accepts: tuple[str, ...] = ("dat",)
    input_shape: tuple = ()  # one image
    input_dtype = "uint8"
    default_batch = 100
    weight_files: list[str] = []  # names a "dat" update must hold

    def info(self) -> dict:
        return {"kind": self.kind, "mode": self.mode, "bit_exact": self.bit_exact}

    def set_weights(self, kind: str, files: dict[str, bytes]) -> dict:
        raise NotImplementedError

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Class index per image of one batch (one accelerator call)."""
        raise NotImplementedError

    def has_weights(self) -> bool:
        return True

    def power_monitor(self):
        """Context manager sampling board power during an evaluation; None = not available."""
        return None

    def close(self) -> None:
        pass

    # shared check for "dat" updates
    def check_dat_names(self, files: dict[str, bytes]) -> None:
        bad = [n for n in files if not safe_file_name(n) or not n.endswith(".dat")]
        if bad:
            raise BackendError("bad_request", f"not runtime-weight file names: {bad[:5]}")
        want, got = set(self.weight_files), set(files)
        if want and want != got:
            missing, extra = sorted(want - got), sorted(got - want)
            raise BackendError("weights_mismatch", f"the accelerator takes exactly its {len(want)} runtime-weight "
                               f"files; missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unknown "
                               f"{extra[:5]}{'...' if len(extra) > 5 else ''}")


# ----------------------------------------------------------------------------- power


class RailMonitor:
    """Samples ``pynq.get_rails()`` power sensors in a thread (board only)."""

    def __init__(self, rails: dict, interval: float = 0.05):
        self.rails = {k: r for k, r in rails.items() if getattr(r, "power", None) is not None}
        self.interval = interval
        self.samples: dict[str, list[float]] = {k: [] for k in self.rails}
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self):
        for k, r in self.rails.items():
            try:
                self.samples[k].append(float(r.power.value))
            except Exception:
                pass

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self._sample()
        return False

    def result(self) -> dict | None:
        means = {k: float(np.mean(v)) for k, v in self.samples.items() if v}
        if not means:
            return None
        n = min(len(v) for v in self.samples.values() if v)
        totals = np.sum([v[:n] for v in self.samples.values() if v], axis=0)
        return {"mean": round(float(sum(means.values())), 4), "max": round(float(np.max(totals)), 4),
                "rails": {k: round(v, 4) for k, v in means.items()}, "samples": int(n)}


# ----------------------------------------------------------------------------- synthetic


class SyntheticBackend(Backend):
    """Deterministic stand-in (numpy only): class = (sum of an image's values + offset) % classes,
    where ``offset`` is the sum of the 32-bit words of the weight files. Its weight set
    is ``synthetic.dat``."""

    kind = "synthetic"
    mode = "synthetic (protocol test, no accelerator)"
    bit_exact = False

    def __init__(self, input_shape=(32, 32, 3), classes: int = 10, batch: int = 100, delay_s: float = 0.0):
        self.input_shape = tuple(input_shape)
        self.classes = classes
        self.default_batch = batch
        self.delay_s = delay_s
        self.offset = 0
        self.weight_files = ["synthetic.dat"]

    @staticmethod
    def offset_of(files: dict[str, bytes]) -> int:
        return sum(int(parse_dat(files[name]).sum(dtype=np.uint64)) for name in sorted(files))

    def set_weights(self, kind, files):
        if kind != "dat":
            raise BackendError("unsupported", "the synthetic backend takes 'dat' weights")
        self.check_dat_names(files)
        try:
            self.offset = self.offset_of(files)
        except ValueError:
            raise BackendError("weights_mismatch", "synthetic.dat must hold hex words") from None
        return {"layers": 1}

    def infer(self, batch):
        if self.delay_s:
            time.sleep(self.delay_s)
        s = np.asarray(batch, dtype=np.int64).reshape(len(batch), -1).sum(1)
        return (s + self.offset) % self.classes

    @staticmethod
    def expected(images: np.ndarray, offset: int, classes: int = 10) -> np.ndarray:
        return (np.asarray(images, dtype=np.int64).reshape(len(images), -1).sum(1) + offset) % classes


# ----------------------------------------------------------------------------- board


def find_deploy_files(deploy: str | os.PathLike) -> tuple[Path, Path]:
    """(bitfile, settings.json) of a FINN deployment package folder."""
    d = Path(deploy)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a folder")
    settings = next((p for p in (d / "driver" / "settings.json", d / "settings.json") if p.exists()), None)
    if settings is None:
        raise FileNotFoundError(f"{d}: no driver/settings.json (copy the whole deployment package)")
    bits = sorted(d.glob("bitfile/*.bit")) or sorted(d.glob("*.bit"))
    if not bits:
        raise FileNotFoundError(f"{d}: no bitfile/*.bit")
    if len(bits) > 1:
        named = [b for b in bits if b.name == "finn-accel.bit"]
        if len(named) != 1:
            raise FileNotFoundError(f"{d}: several bitfiles {', '.join(b.name for b in bits)}")
        bits = named
    return bits[0], settings


class BoardBackend(Backend):
    """The FINN accelerator on a PYNQ board (finn-plus-driver)."""

    kind = "board"
    mode = "board (FPGA accelerator)"
    bit_exact = True
    accepts = ("dat",)

    def __init__(self, deploy: str | os.PathLike, batch: int = 100, state_dir: str | None = None,
                 power: bool = True, download: bool = True):
        self.bitfile, self.settings_path = find_deploy_files(deploy)
        settings = json.loads(self.settings_path.read_text())["driver_information"]
        self.driver_info = settings
        io = settings["io_shape_dict"]
        shape = list(io["ishape_normal"][0])
        self.input_shape = tuple(shape[1:])
        idt = str(io["idt"][0])
        self.input_dtype = "int8" if "'INT8'" in idt or idt == "INT8" else "uint8"
        self.default_batch = batch
        built_dir = self.settings_path.parent / "runtime_weights"
        self.built_weights = {p.name: p.read_bytes() for p in sorted(built_dir.glob("*.dat"))}
        self.weight_files = sorted(self.built_weights)
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="fedfinn-board-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._serial = 0
        self._rails = None
        # lazy: pynq and the driver exist only on the board image
        try:
            from finn_plus_driver import get_driver_class
        except ImportError as err:
            raise RuntimeError("finn-plus-driver is not installed (run client_pynq/install.sh on the board)") from err
        cls = get_driver_class(settings["driver_type"])
        kw = {k: v for k, v in settings.items() if k != "driver_type"}
        kw["runtime_weight_dir"] = str(built_dir) if built_dir.is_dir() else str(self.state_dir / "none")
        kw["batch_size"] = batch
        kw["download"] = download
        self.accel = cls(str(self.bitfile), **kw)
        if power:
            try:
                from pynq import get_rails

                self._rails = get_rails() or None
            except Exception:
                self._rails = None

    def info(self):
        d = super().info()
        d.update({"bitfile": self.bitfile.name, "fclk_mhz": getattr(self.accel, "fclk_mhz_actual", None),
                  "power_rails": sorted(self._rails) if self._rails else []})
        return d

    def set_weights(self, kind, files):
        if kind != "dat":
            raise BackendError("unsupported", "a board takes the runtime-weight files ('dat')")
        self.check_dat_names(files)
        for name, data in files.items():  # every word, before anything is staged or written
            try:
                n_new = len(parse_dat(data))
            except ValueError as err:
                raise BackendError("weights_mismatch", f"{name}: {err}") from None
            n_old = len(self.built_weights[name].split())
            if n_new != n_old:
                raise BackendError("weights_mismatch", f"{name}: {n_new} words, the accelerator has {n_old}")
        self._serial += 1
        stage = self.state_dir / f"rw-{self._serial}"
        stage.mkdir()
        for name, data in files.items():
            (stage / name).write_bytes(bytes(data))
        self.accel.runtime_weight_dir = str(stage)
        try:
            self.accel.load_runtime_weights(flush_accel=True, verify=True)
        except Exception as err:
            # finn-plus-driver 1.6.1's read-back check is a bare `assert`: say what it means
            why = str(err) or ("a weight word read back over AXI-lite differs from the one written"
                               if isinstance(err, AssertionError) else type(err).__name__)
            raise BackendError("backend_error", f"load_runtime_weights failed: {why}", partial=True) from err
        for old in self.state_dir.glob("rw-*"):
            if old != stage:
                shutil.rmtree(old, ignore_errors=True)
        return {"layers": len(files)}

    def infer(self, batch):
        n = len(batch)
        x = np.ascontiguousarray(batch, dtype=np.dtype(self.input_dtype))
        if n > self.accel.batch_size:
            self.accel.batch_size = n  # reallocates the DMA buffers (only when a batch grows)
        if n < self.accel.batch_size:  # a short last batch: pad, keep the buffers
            pad = np.zeros((self.accel.batch_size - n,) + x.shape[1:], dtype=x.dtype)
            x = np.concatenate([x, pad])
        out = self.accel.execute(x)
        return np.asarray(out).reshape(len(x), -1)[:n, 0].astype(np.int64)

    def power_monitor(self):
        return RailMonitor(self._rails) if self._rails else None


# ----------------------------------------------------------------------------- emulators (host)


class BitExactEmulator(Backend):
    """The folded dataflow model of a build, fed with the board's own ``.dat`` files."""

    kind = "emulate-bitexact"
    bit_exact = True
    accepts = ("dat",)
    mode = BITEXACT_LABEL

    def __init__(self, build: str | os.PathLike, batch: int = 100, fallback=None):
        # onnx/qonnx are on the host only: a board image imports this module without them
        from .buildfiles import find_folded_model
        from .dataflow import DataflowModel, DatCodec

        self.build = Path(build)
        self.model_path = find_folded_model(self.build)
        self.df = DataflowModel(self.model_path, fallback=fallback)
        self.input_shape = tuple(self.df.in_shape[1:])
        self.input_dtype = "int8" if self.df.in_dt.signed else "uint8"
        self.default_batch = batch
        # a build folder keeps them in driver/, a `hw weights` output folder next to model.onnx
        rw = next((d for d in (self.build / "driver" / "runtime_weights", self.build / "runtime_weights")
                   if d.is_dir()), None)
        self.weight_files = sorted(p.name for p in rw.glob("*.dat")) if rw else []
        self.codec = DatCodec(rw) if self.weight_files else None
        if self.codec is not None:
            self.codec.check(self.df)
            if self.codec.files != self.weight_files:
                raise ValueError(f"{rw}: the layout file describes {len(self.codec.files)} files, "
                                 f"the folder holds {len(self.weight_files)}")

    def info(self):
        d = super().info()
        d.update({"build": str(self.build), "fallback_layers": self.df.fallback_nodes})
        return d

    def set_weights(self, kind, files):
        if kind != "dat":
            raise BackendError("unsupported", "the bit-exact emulator takes the runtime-weight files ('dat'); "
                               "'values' is for --mode fast")
        if self.codec is None:
            raise BackendError("unsupported", "this build has no runtime-writable weights")
        self.check_dat_names(files)
        new = {}
        for name, data in files.items():
            try:
                layer, value = self.codec.decode(name, bytes(data))
            except (ValueError, KeyError, OverflowError) as err:
                raise BackendError("weights_mismatch", f"{name}: {err}") from None
            new[layer] = value
        for layer, value in new.items():  # all decoded first: nothing half-applied
            self.df.set_param(layer, value)
        return {"layers": len(new)}

    def infer(self, batch):
        y = self.df.predict(np.asarray(batch))
        return y[:, 0].astype(np.int64)


class FastEmulator(Backend):
    """The build's own graph (input stage + network + TopK) in onnxruntime; a round sends values only."""

    kind = "emulate-fast"
    mode = FAST_LABEL
    bit_exact = False
    accepts = ("values",)

    def __init__(self, build: str | os.PathLike, batch: int = 100, threads: int = 0):
        import onnx

        from .fastonnx import build_model_path, to_ort, value_specs

        self.build = Path(build)
        self.model_path = build_model_path(self.build)  # the only graph this backend runs
        base = onnx.load(str(self.model_path))
        shape = [d.dim_value for d in base.graph.input[0].type.tensor_type.shape.dim]
        if len(shape) != 4 or not all(shape[1:]):
            raise ValueError(f"{self.model_path}: expected an NHWC image input, got shape {shape}")
        self.input_shape = tuple(shape[1:])
        self.default_batch = batch
        self.threads = threads
        self.specs = value_specs(base)  # what a round may change: names -> shapes
        self.value_floats = int(sum(int(np.prod(s, dtype=np.int64)) for s in self.specs.values()))
        self._ort = to_ort(base)  # converted once; per round only values change
        self.weight_files = []
        self._sess = self._session(self._ort.SerializeToString())  # the build's own values until a round's

    def info(self):
        d = super().info()
        d.update({"build": str(self.build), "graph": self.model_path.name, "values": len(self.specs),
                  "value_floats": self.value_floats})
        return d

    def has_weights(self):
        return self._sess is not None

    def _session(self, model: bytes):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def set_weights(self, kind, files):
        if kind != "values":
            raise BackendError("unsupported", "the fast emulator runs its build's own graph and takes only the "
                               "round's parameter values ('values': named float32 arrays), never a model")
        from .fastonnx import check_values, with_values

        try:
            values = check_values(self.specs, files)
        except ValueError as err:
            raise BackendError("weights_mismatch", str(err)[:500]) from None
        self._sess = self._session(with_values(self._ort, values))  # replaced only once it is made
        return {"layers": len(values)}

    def infer(self, batch):
        x = np.asarray(batch, dtype=np.float32)
        out = self._sess.run(None, {self._sess.get_inputs()[0].name: x})[0]
        return np.asarray(out).reshape(len(x), -1)[:, 0].astype(np.int64)


def make_backend(args) -> Backend:
    """The backend the ``serve`` command line asks for."""
    if getattr(args, "synthetic", False):
        return SyntheticBackend(batch=args.batch_size or 100)
    if getattr(args, "emulate", None):
        if args.mode == "fast":
            return FastEmulator(args.emulate, batch=args.batch_size or 100, threads=args.threads)
        return BitExactEmulator(args.emulate, batch=args.batch_size or 100)
    if getattr(args, "deploy", None):
        return BoardBackend(args.deploy, batch=args.batch_size or 100, state_dir=args.state_dir,
                            power=not args.no_power)
    raise ValueError("give --deploy DIR (board), --emulate BUILD (host) or --synthetic")


__all__ = ["Backend", "BackendError", "BitExactEmulator", "BoardBackend", "FastEmulator", "RailMonitor",
           "SyntheticBackend", "make_backend"]
