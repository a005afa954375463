"""A vectorized drop-in for finn-plus's ``pack_innermost_dim_as_hex_string``.

finn-plus packs weights bit by bit with ``bitstring`` (``array2hexstring``
per row): writing the runtime-weight files of a CNV takes 15-45 s that way.
:func:`fast_pack_innermost_dim_as_hex_string` produces the same strings with
numpy bit operations (integer, binary and bipolar types; anything else falls
back to finn's function), and :func:`fast_packing` swaps it into the layer
modules for the duration of a ``with`` block. tests/test_hw.py checks it
string for string against finn's and the resulting ``.dat`` files byte for
byte against the ones finn's weight-file writer makes with its own packer.

Targets finn-plus 1.6.1 (``finn.util.data_packing.pack_innermost_dim_as_hex_string``,
imported by name into the layer modules of :data:`_MODULES`); its version and source
fingerprint are recorded in export.finn_env.LIBRARY_TARGETS and checked by
tests/test_hw.py, which fails when finn-plus changes the function.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
from qonnx.core.datatype import DataType

from finn.util import data_packing as _dp

_MODULES = (
    "finn.custom_op.fpgadataflow.matrixvectoractivation",
    "finn.custom_op.fpgadataflow.vectorvectoractivation",
    "finn.custom_op.fpgadataflow.rtl.thresholding_rtl",
    "finn.custom_op.fpgadataflow.hls.thresholding_hls",
)


def fast_pack_innermost_dim_as_hex_string(ndarray, dtype, pad_to_nbits, reverse_inner=False, prefix="0x"):
    orig = _ORIGINAL
    a = np.asarray(ndarray, dtype=np.float32) if not (
        isinstance(ndarray, np.ndarray) and ndarray.dtype in (np.float32, np.float16)) else ndarray
    if pad_to_nbits < 4:
        pad_to_nbits = 4
    dt = dtype
    if dt == DataType["BIPOLAR"]:
        a = (a + 1) / 2
        dt = DataType["BINARY"]
    if not dt.is_integer() or dt.bitwidth() > 62 or pad_to_nbits % 4 != 0 or a.ndim == 0:
        return orig(ndarray, dtype, pad_to_nbits, reverse_inner=reverse_inner, prefix=prefix)
    if reverse_inner:
        a = np.flip(a, -1)
    bw = dt.bitwidth()
    n = a.shape[-1]
    if n * bw > pad_to_nbits:
        raise Exception("Number of bits is greater than pad_to_nbits")
    if not (np.all(a == np.round(a)) and a.min(initial=0) >= dt.min() and a.max(initial=0) <= dt.max()):
        raise AssertionError("This value is not permitted by chosen dtype.")
    codes = a.astype(np.int64).reshape(-1, n) & ((1 << bw) - 1)  # two's complement for signed
    shifts = np.arange(bw - 1, -1, -1, dtype=np.int64)
    bits = ((codes[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(codes.shape[0], n * bw)
    total = pad_to_nbits + (-pad_to_nbits) % 8  # whole bytes; a leading nibble is cut below
    padded = np.zeros((bits.shape[0], total), dtype=np.uint8)
    padded[:, total - n * bw:] = bits
    packed = np.packbits(padded, axis=1)
    cut = (total - pad_to_nbits) // 4
    strs = [prefix + row.tobytes().hex()[cut:] for row in packed]
    return np.array(strs).reshape(a.shape[:-1])


_ORIGINAL = _dp.pack_innermost_dim_as_hex_string


@contextlib.contextmanager
def fast_packing():
    """Use the vectorized packer in finn's weight/threshold layers inside the block."""
    saved = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "pack_innermost_dim_as_hex_string"):
            saved.append((mod, mod.pack_innermost_dim_as_hex_string))
            mod.pack_innermost_dim_as_hex_string = fast_pack_innermost_dim_as_hex_string
    try:
        yield
    finally:
        for mod, fn in saved:
            mod.pack_innermost_dim_as_hex_string = fn
