"""What the agent reads of a ``fedfinn hw build`` folder and of runtime-weight files.

Standard library + numpy only (the board backend uses :func:`parse_dat`).

* :func:`find_step_model` - the model a build step left in the build folder; the
  one place on the board side that knows where (``client_pynq`` imports
  nothing of the project, so this mirrors ``hw.build.find_intermediate``):
  fedfinn's own step runner writes ``intermediate/NN_<step>.onnx``, FINN's
  step runner ``intermediate_models/<step>.onnx``; both are looked for.
* :func:`find_folded_model` - the folded dataflow model (bit-exact emulation).
* :func:`parse_dat` - the words of a runtime-weight file, strictly: every word
  1..8 hex digits (what FINN's driver generator writes and what
  ``finn-plus-driver`` turns into uint32 with ``int(word, 16)``); a sign, a
  ``0x`` prefix, ``_`` or a longer word is refused, so nothing reaches the
  driver that it would fail on half-way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

#: The step whose model is the accelerator's input stage + network + TopK (hw/build.py).
STEP_INPUT_STAGE = "step_preprocess_io"
#: The step whose model is the final folded dataflow model (hw.build.FINAL_STEP).
STEP_FOLDED = "step_generate_estimate_reports"

MAX_WORD = 0xFFFFFFFF
_WORD = re.compile(rb"[0-9A-Fa-f]{1,8}")


def find_step_model(build: str | os.PathLike, step: str) -> Path:
    """The model ``step`` left in the build folder ``build``; FileNotFoundError if none."""
    b = Path(build)
    hits = sorted((b / "intermediate").glob(f"[0-9][0-9]_{step}.onnx"))
    if hits:
        return hits[-1]
    finn = b / "intermediate_models" / f"{step}.onnx"
    if finn.is_file():
        return finn
    raise FileNotFoundError(f"{b}: no model of {step} (intermediate/NN_{step}.onnx or "
                            f"intermediate_models/{step}.onnx): not a `hw build` folder")


def find_folded_model(build: str | os.PathLike) -> Path:
    """The folded model of a build folder (or a ``hw weights`` output folder, or an .onnx file)."""
    p = Path(build)
    if p.is_file():
        return p
    if (p / "model.onnx").exists():
        return p / "model.onnx"
    return find_step_model(p, STEP_FOLDED)


def parse_dat(data: bytes | bytearray | memoryview | str) -> np.ndarray:
    """Words of a runtime-weight file (whitespace-separated hex, 1..8 digits each) as uint32.

    Raises ValueError (never anything else) for anything but such words."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    toks = raw.split()
    bad = next((t for t in toks if not _WORD.fullmatch(t)), None)
    if bad is not None:
        shown = bad[:12].decode("ascii", "replace")
        raise ValueError(f"not a runtime-weight word: {shown!r} (1..8 hex digits, unsigned 32 bits)")
    return np.array([int(t, 16) for t in toks], dtype=np.uint32)
