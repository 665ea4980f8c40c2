import math

import numpy as np
import pytest

from moekit.confidence import (
    VERDICTS,
    Interval,
    bootstrap_interval,
    mean_interval,
    paired_difference,
    ratio_interval,
    verdict,
)


def test_mean_interval_matches_the_t_table():
    # n=5: t_{0.975, 4} = 2.7764; sd = 1.5811, sem = 0.7071 -> half-width 1.9632
    ci = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ci.estimate == 3.0 and ci.n == 5 and ci.method == "t"
    assert ci.low == pytest.approx(3.0 - 1.9632, abs=1e-3)
    assert ci.high == pytest.approx(3.0 + 1.9632, abs=1e-3)
    assert ci.format(".3g") == "3 [1.04, 4.96]"


def test_one_value_has_no_interval_and_equal_values_a_zero_width_one():
    one = mean_interval([0.7])
    assert not one.defined and not one.excludes(0.0) and "no CI" in one.format()
    same = mean_interval([2.0, 2.0, 2.0])
    assert (same.low, same.high) == (2.0, 2.0)
    exact = bootstrap_interval([2.0, 2.0, 2.0])
    assert exact.method == "exact" and (exact.low, exact.high) == (2.0, 2.0)


@pytest.mark.parametrize("make", [lambda x: mean_interval(x), lambda x: bootstrap_interval(x, n_resamples=999)])
def test_intervals_cover_the_true_mean_about_95_percent_of_the_time(make):
    rng = np.random.default_rng(0)
    trials = 300
    covered = sum(make(rng.normal(1.0, 2.0, size=20)).excludes(1.0) is False for _ in range(trials))
    assert 0.88 <= covered / trials <= 0.99  # binomial sd at 95% over 300 trials is 1.3 points


def test_paired_difference_removes_the_shared_seed_variation():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0.0, 5.0, size=6)  # large, shared by both methods
    a = 80.0 + seed_effect + 0.5 + rng.normal(0.0, 0.05, size=6)
    b = 80.0 + seed_effect
    paired = paired_difference(a, b)
    assert paired.excludes(0.0) and paired.low > 0
    unpaired_a, unpaired_b = mean_interval(a), mean_interval(b)
    assert unpaired_a.low < unpaired_b.high  # the separate intervals overlap: only pairing resolves it
    assert paired_difference(a, b, method="bootstrap").low > 0


def test_ratio_interval_is_the_ratio_of_sums_and_resamples_documents_together():
    bits = np.array([100.0, 210.0, 95.0, 400.0, 160.0, 330.0])
    nbytes = np.array([50.0, 100.0, 50.0, 200.0, 80.0, 160.0])
    ci = ratio_interval(bits, nbytes, n_resamples=999)
    assert ci.estimate == pytest.approx(bits.sum() / nbytes.sum())
    assert ci.low <= ci.estimate <= ci.high
    assert ci == ratio_interval(bits, nbytes, n_resamples=999)  # deterministic for a seed
    with pytest.raises(ValueError, match="denominators"):
        ratio_interval(bits, -nbytes)


def test_verdicts_follow_the_interval_not_the_mean():
    up = Interval(1.0, 0.2, 1.8, 5, 0.95, "t")
    down = Interval(-1.0, -1.8, -0.2, 5, 0.95, "t")
    straddle = Interval(0.9, -0.1, 1.9, 5, 0.95, "t")
    undefined = Interval(2.0, math.nan, math.nan, 1, 0.95, "t")
    assert verdict(up) == "supported" and verdict(down) == "contradicted"
    assert verdict(straddle) == VERDICTS[2] and verdict(undefined) == VERDICTS[2]
    assert verdict(down, claimed="negative") == "supported"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mean_interval([]), "empty"),
        (lambda: mean_interval([1.0, float("nan")]), "NaN"),
        (lambda: mean_interval([1.0, 2.0], level=1.5), "level"),
        (lambda: paired_difference([1.0, 2.0], [1.0]), "paired"),
        (lambda: paired_difference([1.0, 2.0], [1.0, 3.0], method="z"), "method"),
        (lambda: bootstrap_interval([1.0, 2.0], [1.0, 2.0]), "statistic"),
        (lambda: verdict(Interval(0, 0, 0, 1, 0.95, "t"), claimed="up"), "claimed"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
