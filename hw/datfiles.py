"""The runtime-weight files of a build: which layer each ``.dat`` file is, and where each weight sits in it.

finn-plus's driver generator (``MakePYNQDriver``) writes one file per
runtime-writable MVAU/Thresholding layer, ``runtime_weights/<p>_<k>_<layer>.dat``
(partition index, runtime layer index in that partition, node name), each a
list of 32-bit hex words that finn-plus-driver writes over AXI-lite. The bit
layout of those words (FINN's ``make_weight_file(..., "decoupled_runtime",
...)``: folding-dependent interleaving, padding, two's complement, bipolar as
0/1) is not re-implemented here: it is *measured* once per layer by encoding
probe tensors with FINN's own ``make_weight_file`` (each field's position from
an all-ones tensor, then each field's element index, ``bits`` bits of the index
per probe), and checked by a round trip of a random tensor.

:func:`write_layout` stores the result beside the files as
``runtime_weights_layout.json`` (file -> layer, shape, data type, field width,
word count) and ``runtime_weights_layout.npz`` (per file: the least
significant bit of each field and the element index it holds). The board side
(client_pynq.dataflow.DatCodec) decodes ``.dat`` files with it without FINN;
the host side can encode a layer's tensor into words with it without FINN.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from export.finn_env import prepare

prepare()

from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402

from .packing import fast_packing  # noqa: E402

LAYOUT_JSON = "runtime_weights_layout.json"
LAYOUT_NPZ = "runtime_weights_layout.npz"
LAYOUT_VERSION = 1


def runtime_weight_layers(parent: ModelWrapper) -> list[tuple[str, ModelWrapper, object]]:
    """``(file name, dataflow model, node)`` of every runtime-weight file, in the order and with the names
    finn-plus 1.6.1's ``MakePYNQDriver._generate_weight_files`` gives them (one loop over the
    StreamingDataflowPartitions of the driver's parent model, MVAU* and Thresholding* nodes only)."""
    out = []
    for p, sdp in enumerate(parent.graph.node):
        df = ModelWrapper(getCustomOp(sdp).get_nodeattr("model"))
        k = 0
        for node in df.graph.node:
            if not (node.op_type.startswith("MVAU") or node.op_type.startswith("Thresholding")):
                continue
            if getCustomOp(node).get_nodeattr("runtime_writeable_weights") == 1:
                out.append((f"{p}_{k}_{node.name}.dat", df, node))
                k += 1
    return out


def parse_words(text: str) -> np.ndarray:
    """The 32-bit words of a ``.dat`` file (whitespace-separated hex) as uint32."""
    toks = text.split()
    if any(len(t) > 8 for t in toks):
        raise ValueError("runtime-weight words must be at most 32 bits (8 hex digits)")
    return np.array([int(t, 16) for t in toks], dtype=np.uint64).astype(np.uint32)


def _field_values(words: np.ndarray, lsb: np.ndarray, width: int) -> np.ndarray:
    bits = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")
    out = np.zeros(len(lsb), dtype=np.int64)
    for j in range(width):
        out |= bits[lsb + j].astype(np.int64) << j
    return out


def measure_layout(node, weights: np.ndarray, dtype: DataType, probe: Path) -> dict:
    """The bit layout of one layer's runtime-weight file, measured with FINN's own encoder."""
    inst = getCustomOp(node)
    shape = tuple(weights.shape)
    n = int(np.prod(shape))
    bipolar = dtype == DataType["BIPOLAR"]
    if not dtype.is_integer() or dtype.name == "TERNARY":
        raise ValueError(f"{node.name}: runtime weights of type {dtype.name} are not supported")
    width = 1 if bipolar else dtype.bitwidth()
    signed = dtype.signed() and not bipolar

    def value_of(codes: np.ndarray) -> np.ndarray:
        codes = codes.astype(np.int64)
        if bipolar:
            return 2 * codes - 1
        return np.where(codes >= 2 ** (width - 1), codes - 2**width, codes) if signed else codes

    def encode(codes: np.ndarray) -> np.ndarray:
        inst.make_weight_file(value_of(codes).reshape(shape).astype(np.float32), "decoupled_runtime", str(probe))
        return parse_words(probe.read_text())

    ones = encode(np.ones(n, dtype=np.int64))
    lsb = np.flatnonzero(np.unpackbits(ones.astype("<u4").view(np.uint8), bitorder="little"))
    # a file may hold an element more than once (e.g. thresholds shared by all channels, replicated per PE)
    if encode(np.zeros(n, dtype=np.int64)).any() or len(lsb) < n:
        raise ValueError(f"{node.name}: the weight-file layout could not be measured")
    index = np.zeros(len(lsb), dtype=np.int64)
    ids = np.arange(n, dtype=np.int64)
    for shift in range(0, max(1, math.ceil(math.log2(max(n, 2)))), width):
        index |= _field_values(encode((ids >> shift) & ((1 << width) - 1)), lsb, width) << shift
    if len(np.unique(index)) != n or index.max(initial=0) >= n:
        raise ValueError(f"{node.name}: the weight-file layout could not be measured (indices)")
    rnd = np.random.default_rng(0).integers(0, 2**width, size=n)
    back = np.zeros(n, dtype=np.int64)
    back[index] = _field_values(encode(rnd), lsb, width)
    if not np.array_equal(back, rnd):
        raise ValueError(f"{node.name}: weight-file round trip failed")
    meta = {"layer": node.name, "op_type": node.op_type, "shape": list(shape), "dtype": dtype.name,
            "width": width, "signed": signed, "bipolar": bipolar, "words": int(len(ones))}
    return {"meta": meta, "lsb": lsb.astype(np.int64), "index": index}


def write_layout(parent: ModelWrapper, weights_dir: Path) -> Path:
    """Measure the layout of every runtime-weight file of ``parent`` (the driver's partitioned model)
    and write it into ``weights_dir`` beside the ``.dat`` files; returns the JSON path."""
    weights_dir = Path(weights_dir)
    files, arrays = {}, {}
    with fast_packing(), tempfile.TemporaryDirectory(prefix="fedfinn-layout-") as tmp:
        for i, (fname, df, node) in enumerate(runtime_weight_layers(parent)):
            w = df.get_initializer(node.input[1])
            lay = measure_layout(node, w, df.get_tensor_datatype(node.input[1]), Path(tmp) / "probe.dat")
            files[fname] = {**lay["meta"], "arrays": i}
            arrays[f"lsb_{i}"], arrays[f"index_{i}"] = lay["lsb"], lay["index"]
    np.savez_compressed(weights_dir / LAYOUT_NPZ, **arrays)
    path = weights_dir / LAYOUT_JSON
    path.write_text(json.dumps({"version": LAYOUT_VERSION, "files": files}, indent=1))
    return path


def encode(meta: dict, lsb: np.ndarray, index: np.ndarray, tensor: np.ndarray) -> str:
    """The text of a runtime-weight file for ``tensor``, from the layout :func:`measure_layout` measured:
    the inverse of client_pynq.dataflow.DatCodec. Bit-identical to finn-plus's
    ``make_weight_file(..., "decoupled_runtime", ...)`` (tests/test_hw.py)."""
    t = np.asarray(tensor, dtype=np.float64)
    if list(t.shape) != list(meta["shape"]):
        raise ValueError(f"{meta['layer']}: tensor of shape {list(t.shape)}, the file holds {meta['shape']}")
    width = int(meta["width"])
    vals = t.reshape(-1)
    if not np.all(vals == np.round(vals)):
        raise ValueError(f"{meta['layer']}: runtime weights must be integers")
    v = vals.astype(np.int64)
    if meta["bipolar"]:
        if not np.isin(v, (-1, 1)).all():
            raise ValueError(f"{meta['layer']}: bipolar weights must be -1 or +1")
        codes = (v + 1) // 2
    else:
        dt = DataType[meta["dtype"]]
        if v.min(initial=0) < dt.min() or v.max(initial=0) > dt.max():
            raise ValueError(f"{meta['layer']}: values [{v.min()}, {v.max()}] do not fit {meta['dtype']}")
        codes = v & ((1 << width) - 1)  # two's complement for signed types
    bits = np.zeros(int(meta["words"]) * 32, dtype=np.uint8)
    field = codes[index]
    for j in range(width):
        bits[lsb + j] = (field >> j) & 1
    words = np.packbits(bits, bitorder="little").view("<u4")
    # each word as 8 lowercase hex digits and a newline (finn's format), without a Python loop
    hexed = np.frombuffer(words.astype(">u4").tobytes().hex().encode(), dtype=np.uint8).reshape(-1, 8)
    lines = np.concatenate([hexed, np.full((len(hexed), 1), ord("\n"), dtype=np.uint8)], axis=1)
    return lines.tobytes().decode("ascii")


def load_layout(weights_dir: Path) -> tuple[dict, dict]:
    """(file name -> meta, arrays) of a build's runtime-weight layout."""
    weights_dir = Path(weights_dir)
    files = json.loads((weights_dir / LAYOUT_JSON).read_text())["files"]
    with np.load(weights_dir / LAYOUT_NPZ, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return files, arrays


def write_files(model: ModelWrapper, layout_dir: Path, out_dir: Path) -> list[str]:
    """Write every runtime-weight file of the layout in ``layout_dir`` from the same-named layers of
    ``model`` (numpy only; no FINN packing), and copy the layout files along."""
    import shutil

    files, arrays = load_layout(layout_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname, meta in sorted(files.items()):
        node = model.get_node_from_name(meta["layer"])
        if node is None:
            raise KeyError(f"{fname}: the model has no layer {meta['layer']}")
        k = meta["arrays"]
        text = encode(meta, arrays[f"lsb_{k}"], arrays[f"index_{k}"], model.get_initializer(node.input[1]))
        (out_dir / fname).write_text(text)
    for name in (LAYOUT_JSON, LAYOUT_NPZ):
        shutil.copy(Path(layout_dir) / name, out_dir / name)
    return sorted(files)
