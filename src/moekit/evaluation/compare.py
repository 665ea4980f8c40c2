"""Paired comparison of evaluation runs on the same documents, items and prompts.

For each metric both runs have, the difference ``metric(A) - metric(B)`` gets a BCa bootstrap
interval in which the *same* units are resampled for both runs (documents for perplexity, items for
the multiple-choice tasks, prompts for generation), which removes the unit-to-unit variation both
share. The verdict is decided by the interval (``moekit.confidence.verdict``): "A better" when it
lies wholly on A's better side of 0, "B better" on the other side, else "within noise". Runs are
comparable only when they scored the same units: equal data digests and unit ids, equal item
digests for multiple-choice tasks, the same reference for generation (else ValueError).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..confidence import Interval, bootstrap_interval, verdict
from .metrics import METRICS, constant_ratio, unit_arrays

__all__ = ["compare_runs", "compare", "incomparable"]


def _difference_of_ratios(na: np.ndarray, da: np.ndarray, nb: np.ndarray, db: np.ndarray, axis: int = -1) -> Any:
    return na.sum(axis=axis) / da.sum(axis=axis) - nb.sum(axis=axis) / db.sum(axis=axis)


def incomparable(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """Why two results of one task cannot be paired (None when they can)."""
    for key in ("data_sha256", "reference", "items_sha256"):
        if a.get(key) != b.get(key):
            return f"their {key} differ ({a.get(key)} vs {b.get(key)})"
    if [u["id"] for u in a.get("per_unit", [])] != [u["id"] for u in b.get("per_unit", [])]:
        return f"they scored different {a.get('units', 'units')}"
    return None


def compare_runs(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    level: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
    skipped: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Paired differences of run ``a`` minus run ``b`` (runs as in ``evaluate()["runs"]``: ``{"name",
    "tasks"}``) on every task and metric both have. One row per metric (JSON-ready).

    A task the two runs did not score on the same units raises ValueError, or, when a ``skipped``
    list is given, is left out and recorded there as ``{"task", "a", "b", "reason"}``.
    """
    names = (str(a.get("name", "A")), str(b.get("name", "B")))
    rows = []
    for task, ra in a["tasks"].items():
        rb = b["tasks"].get(task)
        if rb is None:
            continue
        reason = incomparable(ra, rb)
        if reason is not None:
            if skipped is None:
                raise ValueError(f"{task} of {names[0]!r} and {names[1]!r} are not comparable: {reason}")
            skipped.append({"task": task, "a": names[0], "b": names[1], "reason": reason})
            continue
        for name, metric in METRICS[task].items():
            if metric.exp:
                continue
            xa, xb = unit_arrays(ra, metric), unit_arrays(rb, metric)
            if xa is None or xb is None:
                continue
            (_, na, da), (_, nb, db) = xa, xb
            ca, cb = constant_ratio(na, da), constant_ratio(nb, db)
            if np.array_equal(na, nb) and np.array_equal(da, db):
                diff = Interval(0.0, 0.0, 0.0, na.size, level, "exact")
            elif ca is not None and cb is not None:  # every resample gives the same difference
                diff = Interval(ca - cb, ca - cb, ca - cb, na.size, level, "exact")
            else:
                diff = bootstrap_interval(na, da, nb, db, statistic=_difference_of_ratios, level=level,
                                          n_resamples=n_resamples, seed=seed)  # fmt: skip
            claim = "negative" if metric.better == "lower" else "positive"
            said = {"supported": f"{names[0]} better", "contradicted": f"{names[1]} better"}
            rows.append({
                "task": task, "metric": name, "better": metric.better, "a": names[0], "b": names[1],
                "a_value": float(na.sum() / da.sum()), "b_value": float(nb.sum() / db.sum()),
                "difference": diff.to_dict(), "units": int(na.size),
                "verdict": said.get(verdict(diff, claimed=claim), "within noise"),
            })  # fmt: skip
    return rows


def compare(
    runs: Sequence[Mapping[str, Any]], *, baseline: int = 0, level: float = 0.95, n_resamples: int = 4999, seed: int = 0
) -> list[dict[str, Any]]:
    """Every run of ``runs`` (two or more) against ``runs[baseline]``: ``compare_runs(run, base)`` rows."""
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(runs)}")
    if not -len(runs) <= baseline < len(runs):
        raise ValueError(f"baseline must index one of the {len(runs)} runs, got {baseline}")
    base = runs[baseline]
    rows = []
    for i, run in enumerate(runs):
        if i != baseline % len(runs):
            rows += compare_runs(run, base, level=level, n_resamples=n_resamples, seed=seed)
    return rows
