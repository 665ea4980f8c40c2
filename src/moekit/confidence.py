"""Confidence intervals and the verdicts that rest on them.

Every comparison moekit reports ("A is better than B") carries a 95% interval and a verdict decided by
the interval, never by the means alone:

* ``mean_interval``: Student-t interval of a mean over independent runs (seeds).
* ``paired_difference``: interval of ``mean(a - b)`` over runs that share a seed (same split, same
  backbone), which removes the seed-to-seed variation both methods share.
* ``bootstrap_interval``: BCa bootstrap of any statistic of one or more *paired* samples (resampled
  with the same indices), e.g. bits per byte = sum of bits / sum of bytes over documents.
* ``verdict``: "supported", "contradicted" or "inconclusive at this scale" for a claimed sign of an
  interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "Interval",
    "mean_interval",
    "paired_difference",
    "bootstrap_interval",
    "ratio_interval",
    "verdict",
    "VERDICTS",
]

#: the three verdicts a claim can get from its interval
VERDICTS = ("supported", "contradicted", "inconclusive at this scale")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes:
        estimate: the statistic on the full sample (the mean for ``mean_interval``).
        low, high: interval bounds (NaN when the sample is too small to give one).
        n: sample size (runs, seeds or documents).
        level: confidence level, e.g. 0.95.
        method: ``"t"``, ``"bootstrap-bca"`` or ``"exact"`` (all values equal).
    """

    estimate: float
    low: float
    high: float
    n: int
    level: float
    method: str

    @property
    def defined(self) -> bool:
        """Whether the bounds are numbers (n large enough)."""
        return not (math.isnan(self.low) or math.isnan(self.high))

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval (False when the interval is undefined)."""
        return self.defined and (value < self.low or value > self.high)

    def format(self, spec: str = ".3g", *, scale: float = 1.0) -> str:
        """``"85.7 [84.9, 86.5]"`` (values multiplied by ``scale``, e.g. 100 for percent)."""
        est = format(self.estimate * scale, spec)
        if not self.defined:
            return f"{est} [n={self.n}, no CI]"
        return f"{est} [{format(self.low * scale, spec)}, {format(self.high * scale, spec)}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; an interval needs at least one value")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values: {arr.tolist()}")
    return arr


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def mean_interval(values: Sequence[float] | np.ndarray, *, level: float = 0.95) -> Interval:
    """Student-t interval of the mean of independent values (one per seed): ``[n]`` -> ``Interval``.

    With one value the bounds are NaN (no spread to estimate); with identical values the interval
    has zero width.
    """
    from scipy import stats

    level = _check_level(level)
    x = _as_array(values, "values")
    n, mean = x.size, float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, level, "t")
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sem
    return Interval(mean, mean - half, mean + half, n, level, "t")


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    method: str = "t",
) -> Interval:
    """Interval of ``mean(a - b)`` where ``a[i]`` and ``b[i]`` come from the same seed.

    ``method="t"`` (default, right for a handful of seeds) or ``"bootstrap"`` (BCa over seeds).
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be paired (same length), got {x.size} and {y.size} values")
    if method == "t":
        return mean_interval(x - y, level=level)
    if method == "bootstrap":
        return bootstrap_interval(x - y, level=level)
    raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")


def bootstrap_interval(
    *samples: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] | None = None,
    level: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
) -> Interval:
    """BCa bootstrap interval of ``statistic(*samples)``; the samples are paired (resampled together).

    Args:
        samples: one or more arrays of equal length N (e.g. per-document bits and bytes).
        statistic: ``f(*arrays, axis=-1) -> value`` (vectorised along ``axis``); default: the mean of
            the single sample.
        level: confidence level.
        n_resamples: bootstrap resamples.
        seed: resampling seed (the interval is deterministic for a given seed).
    """
    from scipy import stats

    level = _check_level(level)
    if not samples:
        raise ValueError("bootstrap_interval needs at least one sample")
    arrays = [_as_array(s, f"samples[{i}]") for i, s in enumerate(samples)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"samples must have equal lengths (they are paired), got {[a.size for a in arrays]}")
    if statistic is None:
        if len(arrays) != 1:
            raise ValueError("pass statistic= when giving more than one sample")
        statistic = np.mean
    n = arrays[0].size
    estimate = float(statistic(*arrays, axis=-1))
    if n == 1:
        return Interval(estimate, math.nan, math.nan, 1, level, "bootstrap-bca")
    if all(np.all(a == a[0]) for a in arrays):
        return Interval(estimate, estimate, estimate, n, level, "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
        res = stats.bootstrap(
            tuple(arrays), statistic, paired=True, vectorized=True, confidence_level=level,
            n_resamples=n_resamples, method="BCa", random_state=np.random.default_rng(seed),
        )  # fmt: skip
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):  # BCa undefined (e.g. every resample equal): percentile bounds
        q = np.quantile(res.bootstrap_distribution, [0.5 - level / 2, 0.5 + level / 2])
        low, high = float(q[0]), float(q[1])
    return Interval(estimate, low, high, n, level, "bootstrap-bca")


def _ratio_of_sums(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    return num.sum(axis=axis) / den.sum(axis=axis)


def ratio_interval(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of ``sum(numerators) / sum(denominators)`` over paired units (documents),
    e.g. bits per byte from per-document bits and byte counts."""
    den = _as_array(denominators, "denominators")
    if (den <= 0).any():
        raise ValueError("denominators must be positive (e.g. bytes per document)")
    return bootstrap_interval(
        numerators, den, statistic=_ratio_of_sums, level=level, n_resamples=n_resamples, seed=seed
    )


def verdict(difference: Interval, *, claimed: str = "positive") -> str:
    """The verdict on a claim about the sign of ``difference`` (e.g. accuracy of A minus B).

    ``claimed="positive"``: the claim is that the difference is > 0 (A better when higher is better);
    ``"negative"``: that it is < 0 (e.g. A has lower loss). Supported when the whole interval lies on
    the claimed side of 0, contradicted when it lies on the other side, otherwise inconclusive.
    """
    if claimed not in ("positive", "negative"):
        raise ValueError(f"claimed must be 'positive' or 'negative', got {claimed!r}")
    if not difference.defined:
        return VERDICTS[2]
    sign = 1.0 if claimed == "positive" else -1.0
    low, high = sorted((sign * difference.low, sign * difference.high))
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]
