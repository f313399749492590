"""qtsplus_vllm.eval.stats: McNemar's exact test, bootstrap intervals and percentiles against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qtsplus_vllm.eval.stats import (
    bootstrap_accuracy,
    bootstrap_paired_difference,
    mcnemar_exact,
    mean,
    percentile,
)


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (0, 0, 1.0),  # no discordant pair: no evidence either way
        (1, 6, 2 * (1 + 7) / 2**7),  # 0.125, the textbook example
        (6, 1, 0.125),  # symmetric
        (0, 5, 2 / 2**5),  # 0.0625: five out of five still not below 0.05
        (0, 6, 2 / 2**6),  # 0.03125
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 0.109375
        (5, 5, 1.0),  # capped at 1
        (0, 20, 2 / 2**20),
    ],
)
def test_mcnemar_exact_known_values(only_a, only_b, p):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_finite():
    # 3000 discordant items (a full Video-MME run): exact integers, no overflow
    assert 0 < mcnemar_exact(1400, 1600) < 0.001
    assert mcnemar_exact(1500, 1500) == 1.0


def test_bootstrap_accuracy_degenerate_and_empty():
    assert bootstrap_accuracy([True] * 30) == (1.0, 1.0)
    assert bootstrap_accuracy([False] * 30) == (0.0, 0.0)
    lo, hi = bootstrap_accuracy([])
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_accuracy_is_reproducible_and_matches_the_normal_interval():
    correct = [True] * 700 + [False] * 300
    lo, hi = bootstrap_accuracy(correct)
    assert (lo, hi) == bootstrap_accuracy(correct)  # fixed seed
    half = 1.96 * math.sqrt(0.7 * 0.3 / 1000)  # 0.0284
    assert lo == pytest.approx(0.7 - half, abs=0.004)
    assert hi == pytest.approx(0.7 + half, abs=0.004)


def test_bootstrap_accuracy_equals_resampling_items():
    # The binomial draw is the item bootstrap in distribution: compare with resampling items.
    rng = np.random.default_rng(1)
    correct = rng.random(40) < 0.6
    explicit = correct[rng.integers(0, 40, size=(20000, 40))].mean(axis=1)
    expected = np.quantile(explicit, [0.025, 0.975])
    lo, hi = bootstrap_accuracy(correct, resamples=20000)
    assert lo == pytest.approx(expected[0], abs=0.026)  # one item is 0.025
    assert hi == pytest.approx(expected[1], abs=0.026)


def test_bootstrap_paired_difference():
    same = [True, False, True, True]
    assert bootstrap_paired_difference(same, same) == (0.0, 0.0)
    # b right on 10 more of 100 items, never the other way: the difference is always >= 0
    a = [False] * 10 + [True] * 60 + [False] * 30
    b = [True] * 10 + [True] * 60 + [False] * 30
    lo, hi = bootstrap_paired_difference(a, b)
    assert 0.0 < lo < 0.1 < hi <= 0.2
    rng = np.random.default_rng(2)
    a, b = rng.random(60) < 0.5, rng.random(60) < 0.6
    idx = rng.integers(0, 60, size=(20000, 60))
    explicit = np.quantile(b[idx].mean(axis=1) - a[idx].mean(axis=1), [0.025, 0.975])
    lo, hi = bootstrap_paired_difference(a, b, resamples=20000)
    assert lo == pytest.approx(explicit[0], abs=0.02)
    assert hi == pytest.approx(explicit[1], abs=0.02)
    with pytest.raises(ValueError):
        bootstrap_paired_difference([True], [True, False])


def test_percentile_and_mean():
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    assert percentile([4.0], 50) == 4.0
    assert percentile([None, 2.0, 4.0], 50) == 3.0
    assert percentile([], 50) is None
    assert mean([1, 2, None, 3]) == 2.0
    assert mean([]) is None
