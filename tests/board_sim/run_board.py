"""Test-only: runs in the board venv (Python 3.10, pynq, finn-plus-driver) with the fake Zynq board
installed (sitecustomize.py). Drives client_pynq's BoardBackend like the agent does: open the
deployment (bitfile + the build's weights), load a later round's .dat files, run batches.
Writes what BoardBackend returned to OUT/result.npz + OUT/result.json; the fake board writes its
own log to OUT/hw.*. tests/test_board_env.py judges both."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pynq  # noqa: F401  (sitecustomize.py puts the fake board in place as pynq loads)

import fake_zynq
from client_pynq.backends import BackendError, BoardBackend

deploy, round_dir, out = (Path(a) for a in sys.argv[1:4])
batch = int(sys.argv[4])
board = fake_zynq.board()  # raises unless the fake board is pynq's device: never a real one
res = {}
t0 = time.time()
b = BoardBackend(deploy, batch=batch, state_dir=str(out / "state"), power=False)
res["init_s"] = round(time.time() - t0, 3)
res["info"] = b.info()
res["input_shape"], res["input_dtype"], res["weight_files"] = list(b.input_shape), b.input_dtype, b.weight_files
board.event("mark", what="init done")

files = {p.name: p.read_bytes() for p in sorted(round_dir.glob("*.dat"))}
t0 = time.time()
res["set_weights"] = b.set_weights("dat", files)
res["set_weights_s"] = round(time.time() - t0, 3)
board.event("mark", what="round loaded")

rng = np.random.default_rng(7)
arrays = {}
for name, n in (("short", batch - 3), ("long", batch + 5)):  # padded to the buffers / buffers grown
    x = rng.integers(0, 256, size=(n, *b.input_shape), dtype=np.uint8)
    t0 = time.time()
    y = b.infer(x)
    res[f"infer_{name}_s"] = round(time.time() - t0, 3)
    arrays[f"x_{name}"], arrays[f"y_{name}"] = x, y
    board.event("mark", what=f"batch {name} done", images=n, batch_size=b.accel.batch_size)

# a weight memory whose read-back differs: the driver's verify must catch it, BoardBackend must say so
first = sorted(files)[0]
board.stick("StreamingDataflowPartition_%d" % int(first.split("_")[0]), 0, 0xDEADBEEF)
try:
    b.set_weights("dat", files)
    res["stuck_word"] = "accepted"
except BackendError as err:
    res["stuck_word"] = {"code": err.code, "partial": err.partial, "message": err.message[:200]}
board.event("mark", what="stuck word tried")

np.savez(out / "result.npz", **arrays)
(out / "result.json").write_text(json.dumps(res, indent=1, default=str))
board.dump(out / "hw")
print(json.dumps(res, default=str))
