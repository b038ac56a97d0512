"""Intervals for every reported figure: Wilson intervals for rates, seeded bootstrap intervals for means and for any
statistic of grouped data (resampling whole images, or whole participants, not rows). Pure numpy, no I/O.

Every function returns plain floats (or None when there is nothing to estimate), never NaN, so the results can go
straight into JSON.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

Interval = Optional[Tuple[float, float]]
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of a binomial rate ``successes / n`` (95% by default); None when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n.
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..{n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _finite(values: Sequence[Optional[float]]) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def bootstrap_mean_interval(values: Sequence[Optional[float]], resamples: int = DEFAULT_RESAMPLES,
                            seed: int = DEFAULT_SEED, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (None and non-finite values left out); None when
    there are no values. One value gives the degenerate interval (v, v)."""
    arr = _finite(values)
    if arr.size == 0:
        return None
    if arr.size == 1:
        return (float(arr[0]), float(arr[0]))
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(resamples, arr.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def bootstrap_grouped(groups: Dict[Hashable, Sequence], statistic: Callable[[List], Optional[float]],
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of ``statistic(items)`` where whole groups are resampled with replacement.

    ``groups`` maps a group (an image, a participant) to its items (rows); ``statistic`` gets the concatenated items
    of one resample and returns a number or None (resamples giving None are left out). Resampling groups, not
    items, keeps the items of one image (or one person) together, as they are not independent. None when there is
    no group or no resample gives a number.
    """
    keys = list(groups)
    if not keys:
        return None
    rng = np.random.default_rng(seed)
    stats: List[float] = []
    for _ in range(resamples):
        picked = rng.integers(0, len(keys), size=len(keys))
        items: List = []
        for i in picked:
            items.extend(groups[keys[i]])
        value = statistic(items)
        if value is not None and math.isfinite(value):
            stats.append(float(value))
    if not stats:
        return None
    lo, hi = np.quantile(np.asarray(stats), [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def permutation_test(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                     seed: int = DEFAULT_SEED) -> Optional[float]:
    """Two-sided permutation test of the difference of means between samples ``a`` and ``b``: the share of label
    permutations whose |mean difference| is at least the observed one (with the +1 correction, so never 0).
    None when either sample is empty."""
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0:
        return None
    observed = abs(x.mean() - y.mean())
    pooled = np.concatenate([x, y])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(resamples):
        perm = rng.permutation(pooled)
        if abs(perm[:x.size].mean() - perm[x.size:].mean()) >= observed - 1e-12:
            hits += 1
    return (hits + 1) / (resamples + 1)


def as_list(interval: Interval) -> Optional[List[float]]:
    """An interval as a JSON-ready [low, high] (or None)."""
    return None if interval is None else [float(interval[0]), float(interval[1])]
