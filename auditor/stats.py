"""Summary statistics: seeded percentile bootstrap (one implementation for every statistic) and FDR control."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

NAN = float("nan")


def _mean(resampled: np.ndarray) -> np.ndarray:
    return np.asarray(resampled.mean(1))


def bootstrap_ci(
    v: np.ndarray,
    *,
    statistic: Callable[[np.ndarray], np.ndarray] = _mean,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the rows of ``v``, seeded.

    Args:
        v: ``[n, ...]`` observations (rows are resampled with replacement).
        statistic: maps resamples ``[k, n, ...]`` to ``[k]`` values (default: the mean).
        resamples: number of bootstrap resamples.
        level: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; the single value for ``n = 1``, NaN for ``n = 0``.
    """
    n = len(v)
    if n == 0:
        return NAN, NAN
    if n == 1:
        value = float(statistic(v[None])[0])
        return value, value
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // v.size)  # bound memory: at most ~2M resampled values at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        stats[start:stop] = statistic(v[rng.integers(0, n, (stop - start, n))])
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def describe(values: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``{mean, median, ci_low, ci_high, n}`` of the finite values; percentile bootstrap CI of the mean.

    NaN values (undefined metrics) are excluded and ``n`` counts the rest; with ``n = 0`` every
    statistic is NaN, with ``n = 1`` the interval is the single value.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": NAN, "median": NAN, "ci_low": NAN, "ci_high": NAN, "n": 0}
    low, high = bootstrap_ci(v, resamples=resamples, level=level, seed=seed)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "ci_low": low, "ci_high": high, "n": n}


def median_ci(v: np.ndarray, seed: int, resamples: int = 1000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the median of ``v``."""
    return bootstrap_ci(v, statistic=lambda r: np.median(r, axis=1), resamples=resamples, seed=seed)


def bh_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    vals = np.empty(m)
    vals[order] = q
    out[ok] = vals
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair of ``[N, D]`` arrays (average ranks for ties; NaN if constant)."""
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), np.nan)
