"""``moekit reproduce comet``: the quick run writes a readable report; the statistics are exact."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli.main import main
from moekit.experiments.comet_report import expected_best_curve, mean_se, top_trials, trials_to_match


def test_quick_run_writes_report(tmp_path, capsys) -> None:
    out = tmp_path / "comet"
    gates = "softmax,topk,topk+,hash+,dselect,comet,comet+"
    assert main(["reproduce", "comet", "--quick", "--quiet", "--gates", gates, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "### synthetic" in report and "### multidigits" in report and "budget.png" in report
    results = json.loads((out / "results.json").read_text())
    for name, dataset in results["datasets"].items():
        assert list(dataset["trials"]) == gates.split(",")
        for gate, trials in dataset["trials"].items():
            assert len(trials) == 2
            for t in trials:
                test = t["test"]
                assert len(test["metric"]) == 2 and len(test["slots_per_expert"]) == 2
                if gate.rstrip("+") in ("topk", "hash"):
                    assert test["experts_per_example"] == [2.0, 2.0]  # sparse gates run exactly k experts
                if gate.endswith("+"):
                    assert 0.02 <= t["hparams"]["local_search_fraction"] <= 0.2
        if name == "multidigits":
            assert all(0 <= m <= 1 for t in dataset["trials"]["topk"] for m in t["test"]["metric"])
    for png in ["budget.png", "utilisation_synthetic.png", "utilisation_multidigits.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best val loss" in capsys.readouterr().out


def test_unknown_gate_is_a_user_error(tmp_path, capsys) -> None:
    assert main(["reproduce", "comet", "--quick", "--gates", "topk,moe", "--out", str(tmp_path / "x")]) == 2
    assert "unknown gates/datasets ['moe']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0, 5.0], [0.5, 0.5, 0.1], [0.1, 0.1, 0.5], [4.0]])
def test_expected_best_curve_is_exact(values) -> None:
    curve = expected_best_curve(values)
    for m in range(1, len(values) + 1):
        subsets = list(itertools.combinations(values, m))
        assert curve[m - 1] == pytest.approx(sum(min(s) for s in subsets) / len(subsets))
    ties = values.count(min(values))  # the best is certain once every m-subset holds one of them
    assert trials_to_match(curve, min(values) + 1e-12) == len(values) - ties + 1
    assert trials_to_match(curve, min(values) - 1) is None


def test_top_trials_and_standard_error() -> None:
    trials = [{"val_loss": v, "test": {"metric": [v]}} for v in [0.3, 0.1, 0.2, float("inf")]]
    trials[3]["test"] = None  # a diverged trial never counts
    assert [t["val_loss"] for t in top_trials(trials, 0.05)] == [0.1, 0.2]
    mean, se = mean_se([1.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1.0)


@pytest.mark.slow
def test_bench_comet_quick_runs(tmp_path) -> None:
    """The speed benchmark runs on tiny shapes and writes its table; ratios are not asserted here."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_comet.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--reps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "bench_comet_quick.json").read_text())["rows"]
    assert {(r["gate"], r["state"]) for r in rows} == {
        (g, s) for g in ("comet", "dselect") for s in ("saturated", "soft (init)")
    }
    saturated = [r for r in rows if r["state"] == "saturated"]
    assert all(r["experts_run_per_token"] <= 2 for r in saturated)
    assert "| comet | saturated |" in (tmp_path / "bench_comet_quick.md").read_text()
