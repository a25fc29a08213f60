"""Summary statistics: bootstrap confidence intervals of a mean."""

from __future__ import annotations

import numpy as np


def describe(values: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``{mean, median, ci_low, ci_high, n}`` of the finite values; percentile bootstrap CI of the mean.

    NaN values (undefined metrics) are excluded and ``n`` counts the rest; with ``n = 0`` every
    statistic is NaN, with ``n = 1`` the interval is the single value.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "median": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    low, high = bootstrap_ci(v, resamples=resamples, level=level, seed=seed)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "ci_low": low, "ci_high": high, "n": n}


def bootstrap_ci(v: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``v`` (finite values), seeded."""
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // v.size)  # bound memory: at most ~2M indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = v[rng.integers(0, v.size, (stop - start, v.size))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
