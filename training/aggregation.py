"""How the server combines the replies it accepted: FedAvg, or a robust rule, after an optional norm bound.

* ``federation.aggregation = "mean"``: FedAvg, the example-weighted mean;
* ``"median"``: the coordinate-wise median (Flower's FedMedian: unweighted);
* ``"trimmed_mean"``: the coordinate-wise mean after cutting ``trim_fraction``
  of the values at each end (Flower's FedTrimmedAvg: unweighted,
  ``int(trim_fraction * n)`` cut per side);
* ``federation.max_update_norm > 0``: a reply whose update (its change from the
  model the clients received, or the change itself in update mode) has an L2
  norm above the bound is rejected before aggregation, with the norm in the
  round's ``rejected`` reason.

The median and the trimmed mean are Flower's own functions
(``flwr.server.strategy.aggregate``). Everything is computed in float64, and
the result must fit float32 (the codec's type): :class:`AggregateError` says
when it does not, and the server then keeps the previous global model; a
finite reply never makes aggregation raise anything else.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

Values = dict[str, np.ndarray]
RULES = ("mean", "median", "trimmed_mean")
_F32_MAX = float(np.finfo(np.float32).max)


class AggregateError(ValueError):
    """The aggregate cannot travel (not finite in float32)."""


def update_norm(values: Values, reference: Values | None) -> float:
    """L2 norm, over every tensor, of ``values - reference`` (of ``values`` when there is no reference)."""
    total = 0.0
    for name, v in values.items():
        d = v.astype(np.float64) if reference is None else v.astype(np.float64) - reference[name].astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def aggregate(values: list[Values], weights: list[int], rule: str = "mean",
              trim_fraction: float = 0.25) -> dict[str, np.ndarray]:
    """The aggregate of ``values`` (same names and shapes) by ``rule``, in float64."""
    names = list(values[0])
    if rule == "mean":
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        return {n: sum(wi * v[n].astype(np.float64) for wi, v in zip(w, values)) for n in names}
    results = [([v[n].astype(np.float64) for n in names], int(k)) for v, k in zip(values, weights)]
    if rule == "median":
        out = aggregate_median(results)
    elif rule == "trimmed_mean":
        out = aggregate_trimmed_avg(results, trim_fraction)
    else:
        raise ValueError(f"aggregation rule must be one of {', '.join(RULES)}, got {rule!r}")
    return {n: np.asarray(a, dtype=np.float64) for n, a in zip(names, out)}


def to_float32(values: dict[str, np.ndarray]) -> Values:
    """float64 tensors as float32; raises AggregateError naming a tensor that does not fit."""
    out = {}
    for name, v in values.items():
        if not np.isfinite(v).all() or np.abs(v).max(initial=0.0) > _F32_MAX:
            raise AggregateError(f"aggregate of {name!r} does not fit float32 (max |value| "
                                 f"{np.nanmax(np.abs(v)) if np.isfinite(v).any() else float('nan'):.3g})")
        out[name] = v.astype(np.float32)
    return out
