"""Bootstrap intervals for accuracies and paired differences, McNemar's exact test, percentiles.

Accuracy is a mean of 0/1 outcomes, so a bootstrap resample of n items has a Binomial(n, k/n) count
of correct ones: drawing that count directly is the item bootstrap, exactly in distribution, at no
cost for any n. The paired difference of two modes on the same items resamples the four
(right, right) / (right, wrong) / (wrong, right) / (wrong, wrong) cells from a multinomial likewise.
Intervals are percentile intervals of 10,000 resamples with a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0


def bootstrap_accuracy(
    correct: Sequence[bool] | np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy of ``correct`` (NaNs when it is empty)."""
    n = len(correct)
    if n == 0:
        return math.nan, math.nan
    p = float(np.mean(np.asarray(correct, dtype=float)))
    draws = np.random.default_rng(seed).binomial(n, p, size=resamples) / n
    tail = (1 - level) / 2
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def bootstrap_paired_difference(
    a: Sequence[bool] | np.ndarray,
    b: Sequence[bool] | np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(b) - accuracy(a) over items resampled in pairs."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("paired outcomes must have the same length")
    n = len(a)
    if n == 0:
        return math.nan, math.nan
    cells = np.array([np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b)], dtype=float) / n
    draws = np.random.default_rng(seed).multinomial(n, cells, size=resamples)
    diff = (draws[:, 2] - draws[:, 1]) / n
    tail = (1 - level) / 2
    return float(np.quantile(diff, tail)), float(np.quantile(diff, 1 - tail))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a right only, b right only).

    Under the null each discordant item is equally likely to go either way: the p-value is twice the
    smaller binomial tail of Binomial(only_a + only_b, 1/2), capped at 1.
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, j) for j in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation), or None for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
