"""How faithful is a compressed change, and how large? The levers of update mode, on a real global change.

Takes two consecutive checkpoints of a finished run (by default the medium study's fp32 row, rounds
39 and 40), forms the change of the global model between them and compresses it with
``training.updates.compress_update`` at each density and bit width of the grid. For each it reports the
message size (MiB, what would travel) and how close the receiver's copy is to the change: cosine
similarity and relative L2 error. Each point twice: top-k within each tensor (``scope = tensor``, what
the study's rows use) and over the whole model (``scope = model``, ``compression.update_topk``).

Two other layouts, which training.updates does not implement, are measured on the same change to say
whether they would be worth it: every entry at 2 or 3 bits with the scale that minimises the squared
error of each tensor (instead of max|v| / (2^(b-1) - 1), which rounds most entries of a heavy-tailed
change to zero at 2 bits), and the best rank-r approximation of each weight tensor (SVD of its
(out, in x kh x kw) matrix, fp32 factors: the ceiling of PowerSGD-like schemes).

These numbers choose which rows are worth a 40-round run; they do not replace the runs: a single change
without error feedback, not a client's update with its residual.

    python bench/update_levers.py [--run results/study-medium/runs/study_medium_fp32] \\
        --out results/study-medium/update_levers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training import codec
from training.compress import decode_for
from training.config import from_dict
from training.recorder import checkpoint_path, checkpoint_rounds, load_run
from training.task import make_model
from training.updates import SCOPES, SMALL_TENSOR, compress_update, subtract

DENSITIES = (1.0, 0.3, 0.2, 0.1, 0.05, 0.02)
BITS = (8, 4, 2, 1)
MIB = 2**20


def global_change(run_dir: Path) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """The change of the global model between the run's last two checkpoints."""
    run = load_run(run_dir)
    rounds = checkpoint_rounds(run_dir)
    if len(rounds) < 2:
        raise SystemExit(f"{run_dir}: needs two checkpoints, has {rounds}")
    model = make_model(from_dict(run.cfg))
    a, b = (decode_for(model, checkpoint_path(run_dir, r).read_bytes()) for r in rounds[-2:])
    return subtract(b, a), (rounds[-2], rounds[-1])


def fidelity(change: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> tuple[float, float]:
    x = np.concatenate([change[k].reshape(-1).astype(np.float64) for k in change])
    y = np.concatenate([received[k].reshape(-1).astype(np.float64) for k in change])
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    return cos, float(np.linalg.norm(x - y) / np.linalg.norm(x))


def measured(change: dict[str, np.ndarray], fp32_mib: float, nbytes: int, received: dict[str, np.ndarray]) -> dict:
    """Size and fidelity of one compressed change, as the tables show them."""
    cos, err = fidelity(change, received)
    return {"mib": round(nbytes / MIB, 4), "x_smaller": round(fp32_mib / (nbytes / MIB), 1), "cosine": round(cos, 3),
            "rel_l2_error": round(err, 3)}


def lever(change: dict[str, np.ndarray], fp32_mib: float, density: float, bits: int, scope: str) -> dict:
    blob, received = compress_update(change, density, bits, scope=scope)
    return {"density": density, "scope": scope, "bits": bits, **measured(change, fp32_mib, len(blob), received)}


def least_squares_scale(flat: np.ndarray, bits: int) -> np.float32:
    """The scale (of 60 between max|v| / 50 / top and max|v| / top) whose codes lose the least squared error."""
    top = 2 ** (bits - 1) - 1
    candidates = np.float32(np.abs(flat).max() / top) * np.geomspace(0.02, 1, 60).astype(np.float32)
    errors = [float(np.square(flat - np.clip(np.rint(flat / c), -top, top) * c).sum()) for c in candidates]
    return candidates[int(np.argmin(errors))]


def dense_least_squares(change: dict[str, np.ndarray], bits: int) -> tuple[int, dict[str, np.ndarray]]:
    """Every entry at ``bits`` with the error-minimising scale; small tensors as fp32 (as update mode)."""
    tensors, received = {}, {}
    for name, v in change.items():
        if v.size <= SMALL_TENSOR or not np.any(v):
            tensors[name] = received[name] = v.astype(np.float32)
            continue
        scale = least_squares_scale(v.reshape(-1), bits)
        top = 2 ** (bits - 1) - 1
        codes = np.clip(np.rint(v / scale), -top, top).astype(np.int8)
        tensors[name] = codec.QTensor(codes=codes, bits=bits, scale=np.asarray(scale, dtype=np.float32))
        received[name] = (codes * scale).astype(np.float32)
    return len(codec.encode(tensors)), received


def low_rank(change: dict[str, np.ndarray], budget: float) -> tuple[int, dict[str, np.ndarray]]:
    """Each weight tensor's best rank-r approximation with r * (rows + cols) <= budget * entries (fp32
    factors, 4 bytes each); the other tensors whole as fp32. The size counts those floats, no header."""
    nbytes, received = 0, {}
    for name, v in change.items():
        if v.ndim < 2 or v.size <= SMALL_TENSOR:
            received[name] = v
            nbytes += 4 * v.size
            continue
        m = v.reshape(v.shape[0], -1).astype(np.float64)
        r = max(1, int(budget * m.size / sum(m.shape)))
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        received[name] = ((u[:, :r] * sv[:r]) @ vt[:r]).reshape(v.shape).astype(np.float32)
        nbytes += 4 * r * sum(m.shape)
    return nbytes, received


def other_layouts(change: dict[str, np.ndarray], fp32_mib: float) -> list[dict]:
    rows = [(f"every entry, {bits} bits, least-squares scale", dense_least_squares(change, bits)) for bits in (2, 3)]
    rows += [(f"rank-r SVD, factors = 1/{round(1 / budget)} of the entries", low_rank(change, budget))
             for budget in (1 / 32, 1 / 16, 1 / 8)]
    return [{"layout": layout, **measured(change, fp32_mib, nbytes, received)} for layout, (nbytes, received) in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="results/study-medium/runs/study_medium_fp32")
    p.add_argument("--out", default="results/study-medium/update_levers", help="path without suffix")
    args = p.parse_args()
    change, (r0, r1) = global_change(Path(args.run))
    fp32_mib = sum(v.size for v in change.values()) * 4 / MIB
    rows = []
    for density in DENSITIES:
        for bits in BITS:
            for scope in SCOPES if density < 1 else SCOPES[:1]:  # at density 1 both keep everything
                rows.append(lever(change, fp32_mib, density, bits, scope))
    others = other_layouts(change, fp32_mib)
    result = {"what": __doc__.split("\n\n")[0], "run": args.run, "rounds": [r0, r1],
              "fp32_mib": round(fp32_mib, 4), "rows": rows, "other_layouts": others}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Update-mode levers on a real change ({args.run}, rounds {r0} → {r1})", "",
             ("The global model's change between two consecutive checkpoints, compressed by "
             "`training.updates.compress_update` (top-k at `density` within each tensor or over the whole model, "
             "`bits` per kept value, one scale per tensor; tensors of ≤ 1,024 entries whole). `cosine` / `rel_l2_error`: the receiver's copy "
             "against the change. One change, no error feedback: this ranks candidates for the 40-round runs, "
             f"it does not replace them. fp32 change: {fp32_mib:.3f} MiB. `python bench/update_levers.py`."), "",
             "| density | top-k over | bits | MiB | x smaller | cosine | rel. L2 error |",
             "|---:|:--|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['density']:g} | {r['scope']} | {r['bits']} | {r['mib']:.4f} | {r['x_smaller']} | {r['cosine']:.3f} | "
              f"{r['rel_l2_error']:.3f} |" for r in rows]
    lines += ["", "Other layouts (not in training.updates; measured to see whether they would be worth building):", "",
              "| layout | MiB | x smaller | cosine | rel. L2 error |", "|:--|---:|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['mib']:.4f} | {r['x_smaller']} | {r['cosine']:.3f} | {r['rel_l2_error']:.3f} |"
              for r in others]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
