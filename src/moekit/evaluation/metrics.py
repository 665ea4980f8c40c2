"""Every reported number is a ratio of sums over units (documents, items or prompts).

A task result keeps one record per unit (``per_unit``); a metric names the record fields of its
numerator and denominator (None: one per unit, i.e. a mean). Its 95% interval is the BCa bootstrap
of the ratio of sums with units resampled (``moekit.confidence.ratio_interval``): bits per byte =
sum of bits / sum of bytes over documents, accuracy = correct items / items, KL = summed KL / positions
over prompts. The paired comparison (``compare.py``) resamples the same units of two results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..confidence import Interval, ratio_interval

__all__ = ["Metric", "METRICS", "unit_arrays", "constant_ratio", "summarise"]


@dataclass(frozen=True)
class Metric:
    """A ratio of per-unit sums.

    Attributes:
        numerator, denominator: per-unit record fields (denominator None: count units).
        better: ``"lower"`` or ``"higher"``.
        label: how reports name it.
        exp: report ``exp`` of the ratio (perplexity from mean NLL); such metrics are not compared
            (their log is).
        percent: shown as a percentage.
    """

    numerator: str
    denominator: str | None
    better: str
    label: str
    exp: bool = False
    percent: bool = False


METRICS: dict[str, dict[str, Metric]] = {
    "perplexity": {
        "bits_per_byte": Metric("bits", "bytes", "lower", "bits/byte"),
        "nll_per_token": Metric("nats", "tokens", "lower", "NLL/token (nats)"),
        "perplexity": Metric("nats", "tokens", "lower", "perplexity", exp=True),
    },
    "choice": {
        "acc": Metric("correct", None, "higher", "acc", percent=True),
        "acc_norm": Metric("correct_norm", None, "higher", "acc_norm", percent=True),
    },
    "cloze": {
        "acc": Metric("correct", None, "higher", "acc", percent=True),
        "acc_norm": Metric("correct_norm", None, "higher", "acc_norm", percent=True),
    },
    "generate": {
        "kl": Metric("kl", "positions", "lower", "KL to ref (nats/token)"),
        "top1_agreement": Metric("top1", "positions", "higher", "top-1 agreement", percent=True),
        "continuation_agreement": Metric("agree", "new_tokens", "higher", "greedy agreement", percent=True),
        "exact_prefix": Metric("prefix", None, "higher", "exact-match prefix (tokens)"),
        "repetition": Metric("repeats", "ngrams", "lower", "repeated n-grams", percent=True),
        "reference_repetition": Metric("reference_repeats", "ngrams", "lower", "ref repeated n-grams", percent=True),
        "text_repetition": Metric("text_repeats", "text_ngrams", "lower", "text repeated n-grams", percent=True),
    },
}


def unit_arrays(result: Mapping[str, Any], metric: Metric) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """``(unit ids, numerators, denominators)`` of ``metric`` in a task result, or None when a unit
    lacks the fields (e.g. bits per byte of token-id documents, KL without a reference)."""
    units = result.get("per_unit") or []
    fields = [metric.numerator] + ([metric.denominator] if metric.denominator else [])
    if not units or any(u.get(f) is None for u in units for f in fields):
        return None
    num = np.array([float(u[metric.numerator]) for u in units])
    den = np.array([float(u[metric.denominator]) for u in units]) if metric.denominator else np.ones(len(units))
    if (den <= 0).any():
        return None
    return [str(u["id"]) for u in units], num, den


def constant_ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    """The common value of ``num / den`` when every unit has the same ratio (then so has every
    bootstrap resample, and the interval has zero width), else None."""
    ratios = num / den
    return float(ratios[0]) if np.all(ratios == ratios[0]) else None


def _exp(interval: Interval) -> Interval:
    return Interval(math.exp(interval.estimate), math.exp(interval.low), math.exp(interval.high),
                    interval.n, interval.level, interval.method)  # fmt: skip


def summarise(
    task: str, result: Mapping[str, Any], *, level: float = 0.95, n_resamples: int = 4999, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """``{metric: Interval.to_dict()}`` for every metric of ``task`` the result has the fields for."""
    out = {}
    for name, metric in METRICS[task].items():
        arrays = unit_arrays(result, metric)
        if arrays is None:
            continue
        _, num, den = arrays
        same = constant_ratio(num, den)
        if same is not None:
            interval = Interval(float(num.sum() / den.sum()), same, same, num.size, level, "exact")
        else:
            interval = ratio_interval(num, den, level=level, n_resamples=n_resamples, seed=seed)
        out[name] = (_exp(interval) if metric.exp else interval).to_dict()
    return out
