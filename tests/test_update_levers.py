"""bench/update_levers.py's rate-distortion bound: right on a source with a known curve, and above every
layout update mode can build (a bound that some coder beats would be no bound)."""

from __future__ import annotations

import numpy as np


def test_the_curve_of_a_gaussian_is_shannons(bench_module):
    levers = bench_module("update_levers")
    gauss = np.random.default_rng(0).standard_normal(100_000)
    curve = levers.rate_distortion_curve(gauss, slopes=np.geomspace(0.5, 500, 12))
    inside = curve[(curve[:, 0] > 0.3) & (curve[:, 0] < 4)]
    assert len(inside) >= 6
    np.testing.assert_allclose(inside[:, 1], 2.0 ** (-2 * inside[:, 0]), rtol=0.03)
    assert curve[0, 0] == 0 and abs(curve[0, 1] - 1) < 0.02  # nothing sent: the variance


def test_no_update_layout_beats_the_bound_on_a_heavy_tailed_change(bench_module):
    levers = bench_module("update_levers")
    g = np.random.default_rng(1)
    change = {
        "conv.weight": (g.standard_t(3, (48, 16, 3, 3)) * g.uniform(0.2, 2, (48, 1, 1, 1))).astype(np.float32) * 1e-3,
        "fc.weight": (g.laplace(size=(10, 300)) * 1e-2).astype(np.float32),
        "fc.bias": (g.standard_normal(10) * 1e-3).astype(np.float32),  # small: free and exact in the bound
    }
    fp32_mib = sum(v.size for v in change.values()) * 4 / levers.MIB
    rows = [levers.lever(change, fp32_mib, density, bits, "model")
            for density in (1.0, 0.3, 0.1) for bits in (8, 4, 1)]
    bound = levers.rate_distortion_bound(change, fp32_mib, rows)
    for row in bound["beside"]:
        assert row["cosine"] <= row["bound_cosine"] + 1e-3, row
    at = [r["cosine_at_most"] for r in bound["at"]]
    assert at == sorted(at, reverse=True) and at[-1] < 0.99  # more compression, less fidelity


def test_the_bits_go_where_reverse_water_filling_puts_them(bench_module):
    """Gaussian channels of different scales: the bound's trade-off between size and error is the
    closed form (each channel gets error min(theta, variance), rate max(0, log2(sd^2 / theta) / 2))."""
    levers = bench_module("update_levers")
    g = np.random.default_rng(2)
    sd = {"a.weight": np.geomspace(0.1, 3, 24), "b.weight": np.geomspace(0.05, 1, 16)}
    change = {name: (g.standard_normal((s.size, 2000)) * s[:, None]).astype(np.float32) for name, s in sd.items()}
    points = levers.bound_points(change, levers.channel_sources(change))
    variance = np.concatenate([np.square(change[name], dtype=np.float64).mean(axis=1) for name in sd])
    energy = 2000 * variance.sum()
    for theta in (0.5, 0.1, 0.02, 0.005):
        bits = 2000 * np.maximum(0, 0.5 * np.log2(variance / theta)).sum()
        error = 2000 * np.minimum(theta, variance).sum()
        cos = levers.bound_at(points, bits / 8 / levers.MIB)
        np.testing.assert_allclose(1 - cos**2, error / energy, rtol=0.06)
