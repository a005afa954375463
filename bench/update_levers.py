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

The bound: how faithful could *any* coder of this size be? For each weight tensor, Blahut-Arimoto computes
the rate-distortion curve (bits per entry against squared error) of its entries, each output channel
divided by its own RMS (one shape per tensor, one scale per channel); the bits are then shared among all
channels of all tensors where they lower the squared error most (equal slopes), the tensors of at most
1,024 entries counted as free and exact, headers as free. A coder that reaches cosine c at some size
also reaches squared error (1 - c^2) |change|^2 there (scaling its output is free), so
sqrt(1 - D(size) / |change|^2) bounds the cosine of every coder that treats a channel's entries as draws
from one distribution: top-k, scalar quantizers, signs, per-channel scales, entropy coding of any of
them. It does not bound coders that exploit order within a channel (low rank: measured above) or other
rounds and clients. Blahut-Arimoto on a histogram is itself within ~1 % in squared error of the true
curve (checked on a Gaussian and on reverse water-filling, tests/test_update_levers.py): at 32x that
moves the bound by ~0.001 in cosine.

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
SLOPES = np.geomspace(0.05, 3000, 48)  # Blahut-Arimoto slopes, nats per unit of squared error (per-channel RMS 1)
BOUND_RATIOS = (8, 12, 15, 18, 24, 32, 40, 64)  # x smaller than fp32 at which the bound is tabulated
BOUND_COSINES = (0.90, 0.95, 0.96)
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


def rate_distortion_curve(u: np.ndarray, slopes=SLOPES, bins: int = 512, points: int = 256,
                          iterations: int = 400, tol: float = 1e-7) -> np.ndarray:
    """(bits per entry, squared error per entry) of the distribution of ``u`` at each slope, by
    Blahut-Arimoto on its histogram (``bins`` bins, ``points`` reproduction values on the same range),
    plus the point (0 bits, variance). On a Gaussian the error is within ~1 % of 2^(-2R)
    (``tests/test_update_levers.py``)."""
    hist, edges = np.histogram(u, bins=bins)
    x = ((edges[:-1] + edges[1:]) / 2)[hist > 0]
    p = hist[hist > 0] / hist.sum()
    y = np.linspace(edges[0], edges[-1], points)
    d = np.square(x[:, None] - y[None, :])
    nearest = d.min(axis=1, keepdims=True)  # subtracted before exp: each row keeps a nonzero weight
    r = np.full(points, 1.0 / points)
    curve = [(0.0, float(np.var(u)))]
    for slope in slopes:  # ascending, each warm-started from the last output distribution
        a = np.exp(-slope * (d - nearest))
        for _ in range(iterations):
            q = a * r
            q /= q.sum(axis=1, keepdims=True)
            new = p @ q
            converged = np.abs(new - r).max() < tol
            r = np.maximum(new, 1e-300)
            if converged:
                break
        q = a * r
        q /= q.sum(axis=1, keepdims=True)
        info = np.where(q > 0, np.log2(np.where(q > 0, q, 1.0) / r[None, :]), 0.0)
        curve.append((float((p[:, None] * q * info).sum()), float((p[:, None] * q * d).sum())))
    return np.array(curve)


def channel_sources(change: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per tensor of more than SMALL_TENSOR entries: (entries per output channel, each channel's mean
    square, the rate-distortion curve of the entries with each channel scaled to RMS 1)."""
    sources = []
    for v in change.values():
        if v.size <= SMALL_TENSOR:
            continue
        rows = v.reshape(v.shape[0], -1).astype(np.float64)
        power = np.mean(np.square(rows), axis=1)
        live = power > 0
        if not live.any():
            continue
        unit = (rows[live] / np.sqrt(power[live])[:, None]).reshape(-1)
        sources.append((rows.shape[1], power[live], rate_distortion_curve(unit)))
    return sources


def bound_points(change: dict[str, np.ndarray], sources) -> np.ndarray:
    """(MiB, highest possible cosine) along the bound, smallest first: one point per trade-off between
    bits and squared error, every channel at its best point of its tensor's curve for that trade-off."""
    energy = sum(float(np.square(v, dtype=np.float64).sum()) for v in change.values())
    mean_power = float(np.mean(np.concatenate([power for _, power, _ in sources])))
    points = []
    for trade in np.geomspace(1e-3, 1e6, 400) / mean_power:  # bits per unit of squared error
        bits = error = 0.0
        for n, power, curve in sources:
            best = np.argmin(curve[None, :, 0] + trade * power[:, None] * curve[None, :, 1], axis=1)
            bits += n * curve[best, 0].sum()
            error += n * float((power * curve[best, 1]).sum())
        points.append((bits / 8 / MIB, np.sqrt(max(0.0, 1 - error / energy))))
    return np.array(sorted(points))


def bound_at(points: np.ndarray, mib: float) -> float:
    """The highest cosine the bound allows at ``mib`` (interpolated; the bound is increasing in size)."""
    return float(np.interp(mib, points[:, 0], np.maximum.accumulate(points[:, 1])))


def smallest_for(points: np.ndarray, cosine: float) -> float | None:
    """The fewest MiB at which the bound reaches ``cosine`` (None: not within the points)."""
    reach = np.flatnonzero(points[:, 1] >= cosine)
    return float(points[reach[0], 0]) if reach.size else None


def rate_distortion_bound(change: dict[str, np.ndarray], fp32_mib: float, measured_rows: list[dict]) -> dict:
    """The bound tabulated at BOUND_RATIOS and BOUND_COSINES, and beside every measured layout."""
    points = bound_points(change, channel_sources(change))
    at = [{"x_smaller": x, "mib": round(fp32_mib / x, 4), "cosine_at_most": round(bound_at(points, fp32_mib / x), 3)}
          for x in BOUND_RATIOS]
    needs = []
    for c in BOUND_COSINES:
        mib = smallest_for(points, c)
        needs.append({"cosine": c, "mib_at_least": None if mib is None else round(mib, 4),
                      "x_smaller_at_most": round(fp32_mib / mib, 1) if mib else None})  # 0: the free tensors reach it
    beside = [{**row, "bound_cosine": round(bound_at(points, row["mib"]), 3)} for row in measured_rows]
    return {"at": at, "needs": needs, "beside": beside}


def other_layouts(change: dict[str, np.ndarray], fp32_mib: float) -> list[dict]:
    rows = [(f"every entry, {bits} bits, least-squares scale", dense_least_squares(change, bits)) for bits in (2, 3)]
    rows += [(f"rank-r SVD, factors = 1/{round(1 / budget)} of the entries", low_rank(change, budget))
             for budget in (1 / 32, 1 / 16, 1 / 8)]
    return [{"layout": layout, **measured(change, fp32_mib, nbytes, received)} for layout, (nbytes, received) in rows]


def bound_lines(bound: dict) -> list[str]:
    lines = ["", "The bound (see the top of `bench/update_levers.py`): the highest cosine any coder that treats each "
             "output channel's entries as draws from one distribution can reach at a size (headers and the small "
             "tensors free), from Blahut-Arimoto curves per tensor with each channel at its own scale.", "",
             "| x smaller | MiB | cosine at most |", "|---:|---:|---:|"]
    lines += [f"| {r['x_smaller']} | {r['mib']:.4f} | {r['cosine_at_most']:.3f} |" for r in bound["at"]]
    lines += ["", "| cosine | needs at least MiB | x smaller at most |", "|---:|---:|---:|"]
    lines += [f"| {r['cosine']:.2f} | {r['mib_at_least']} | {r['x_smaller_at_most']} |" for r in bound["needs"]]
    lines += ["", "Measured layouts (top-k over the model, and every entry) beside the bound at their own size:", "",
              "| density | bits | MiB | x smaller | cosine | bound | gap |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['density']:g} | {r['bits']} | {r['mib']:.4f} | {r['x_smaller']} | {r['cosine']:.3f} | "
              f"{r['bound_cosine']:.3f} | {r['bound_cosine'] - r['cosine']:.3f} |" for r in bound["beside"]]
    return lines


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
    bound = rate_distortion_bound(change, fp32_mib, [r for r in rows if r["scope"] == "model" or r["density"] == 1])
    result = {"what": __doc__.split("\n\n")[0], "run": args.run, "rounds": [r0, r1],
              "fp32_mib": round(fp32_mib, 4), "rows": rows, "other_layouts": others, "bound": bound}
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
    lines += bound_lines(bound)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
