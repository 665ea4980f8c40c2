"""``moekit reproduce compression``: the quick run end to end (every method, both fractions, with and
without step-matched recovery) and the report's paired claims on hand-made results."""

from __future__ import annotations

import json
import math

import pytest

from moekit.cli.main import main
from moekit.experiments.compression import METHODS, CompressionConfig
from moekit.experiments.compression_report import SECTIONS, claims


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compression") / "run"
    assert main(["reproduce", "compression", "--quick", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_covers_every_method_fraction_and_recovery(quick):
    out, r = quick
    cfg = CompressionConfig.quick()
    assert r["smoke_run"] and r["command"] == "moekit reproduce compression --quick"
    rows = r["rows"]
    assert len(rows) == 2 * (1 + len(METHODS) * len(cfg.removed))
    seen = {(row["method"], row["removed"], row["recovery"]) for row in rows}
    assert {(m, f, rec) for m in METHODS for f in cfg.removed for rec in (False, True)} <= seen
    assert {row["recovery_steps"] for row in rows if row["recovery"]} == {cfg.recovery_steps}  # step-matched
    control = next(row for row in rows if row["method"] == "none" and not row["recovery"])
    assert control["metrics"]["continuation_agreement"]["estimate"] == 1.0
    for row in rows:
        assert all(math.isfinite(m["estimate"]) for m in row["metrics"].values()), row["method"]
        if row["method"] not in ("none", "m-smoe"):
            assert set(row["experts_per_layer"]) == {cfg.kept(row["removed"])}
        if row["method"] == "m-smoe":
            assert sum(row["experts_per_layer"]) == cfg.depth * cfg.kept(row["removed"])
    assert all(row["protected"] is not None for row in rows if row["method"] not in ("none", "m-smoe"))
    report = (out / "report.md").read_text()
    assert "Smoke run" in report and "no verdicts" in report.lower()
    assert (out / "compression_bpb.png").stat().st_size > 1000 and (out / "compression_generation.png").is_file()


def _fake(values: dict[tuple[str, float], list[float]], seeds=(0, 1, 2)) -> dict:
    rows = []
    for (method, removed), vals in values.items():
        for seed, v in zip(seeds, vals):
            for rec in (False, True):
                metrics = {m: {"estimate": v if m == "bits_per_byte" else 0.5} for m in
                           ("bits_per_byte", "acc", "acc_norm", "continuation_agreement", "top1_agreement", "kl", "repetition")}  # fmt: skip
                rows.append({"seed": seed, "method": method, "removed": removed, "recovery": rec, "metrics": metrics,
                             "experts_per_layer": [4], "form": "plain", "protected": None})  # fmt: skip
    return {"experiment": "compression", "config": {"removed": [0.5], "seeds": list(seeds)},
            "methods": {"reap": "", "m-smoe": "", "frequency": ""}, "rows": rows, "smoke_run": False}  # fmt: skip


def test_claims_are_paired_by_seed_with_verdicts():
    r = _fake({("none", 0.0): [1.0, 1.2, 1.4], ("reap", 0.5): [1.1, 1.35, 1.5], ("m-smoe", 0.5): [1.3, 1.5, 1.75],
               ("frequency", 0.5): [1.0, 1.5, 1.4]})  # fmt: skip
    by = {c.statement.split(" (")[0]: c for c in claims(r)}
    beats_msmoe = by["REAP beats M-SMoE on held-out bits/byte"]
    assert beats_msmoe.difference.estimate == pytest.approx(-0.2, abs=1e-9) and beats_msmoe.verdict == "supported"
    assert by["REAP beats frequency pruning on bits/byte"].verdict == "inconclusive at this scale"
    assert "MoNE beats REAP on bits/byte" not in by  # MoNE did not run
    table = SECTIONS["ranking"](r)
    assert "| frequency | 1.300 | — | best |" in table  # lowest mean (1.0, 1.5, 1.4)
    assert "| reap | 1.317 | 0.017 [-0.342, 0.375] | within noise |" in table
