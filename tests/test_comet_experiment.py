"""``moekit reproduce comet``: the quick run writes a readable report; the protocol is fair (shared draws,
fixed gamma for "+", hash k = 1, sparsity decided on validation); the statistics are exact; reruns match."""

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moekit.cli.main import main
from moekit.experiments.comet import CometConfig, draw_hparams, gate_hparams, run_comet
from moekit.experiments.comet_report import (
    _curve_matrix,
    curve_band,
    expected_best_curve,
    is_sparse_trial,
    selected,
    trials_to_match,
)
from moekit.experiments.common import without_timing

GATES = "softmax,topk,topk+,hash,hash+,dselect,dselect+,comet,comet+"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("comet") / "run"
    assert main(["reproduce", "comet", "--quick", "--quiet", "--replicates", "0,1", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_report(quick_run: Path, assert_pngs_readable) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert results["smoke_run"] and results["command"] == "moekit reproduce comet --quick --replicates 0,1"
    for name, dataset in results["datasets"].items():
        assert [r["seed"] for r in dataset["replicates"]] == [0, 1]
        for rep in dataset["replicates"]:
            assert list(rep["trials"]) == GATES.split(",")
            for gate, trials in rep["trials"].items():
                assert len(trials) == 2
                for t in trials:
                    assert "train_s" not in t and len(t["val"]["fraction_hard"]) == 2
                    if gate.rstrip("+") == "topk":
                        assert t["test"]["experts_per_example"] == [2.0, 2.0]
                    if gate.rstrip("+") == "hash":
                        assert t["test"]["experts_per_example"] == [1.0, 1.0]  # the paper's Hash-r: k = 1
    report = (quick_run / "report.md").read_text()
    assert report.index("Smoke run") < report.index("## Setup") and "Smoke run: no verdicts." in report
    assert "**synthetic**" in report and "**multidigits**" in report and "budget.png" in report
    assert_pngs_readable(quick_run, expected=("budget.png", "utilisation_synthetic.png", "utilisation_multidigits.png"))


def test_gates_share_the_hyperparameter_draws_and_plus_gates_fix_gamma(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    cfg = results["config"]
    for dataset in results["datasets"].values():
        for rep in dataset["replicates"]:
            trials = rep["trials"]
            for i in range(2):
                lrs = {trials[g][i]["hparams"]["lr"] for g in trials}
                assert len(lrs) == 1  # trial i has one learning rate for every gate
                assert trials["dselect"][i]["hparams"]["gamma"] == trials["comet"][i]["hparams"]["gamma"]
                assert trials["comet+"][i]["hparams"]["gamma"] == trials["dselect+"][i]["hparams"]["gamma"] == cfg[
                    "plus_gamma"]  # fmt: skip
                assert trials["topk+"][i]["hparams"]["local_search_fraction"] == trials["comet+"][i]["hparams"][
                    "local_search_fraction"]  # fmt: skip
                assert set(trials["topk"][i]["hparams"]) == {"lr"}


def test_draws_depend_only_on_the_seed() -> None:
    cfg = CometConfig()
    assert draw_hparams(cfg, 3) == draw_hparams(cfg, 3) != draw_hparams(cfg, 4)
    draw = draw_hparams(cfg, 0)[0]
    assert gate_hparams("comet", draw, cfg)["gamma"] == draw["gamma"]
    assert gate_hparams("comet+", draw, cfg)["gamma"] == cfg.plus_gamma


def test_sparsity_is_decided_on_validation_routing() -> None:
    def trial(val_hard, test_hard, loss):
        return {"val_loss": loss, "val": {"fraction_hard": val_hard}, "test": {"fraction_hard": test_hard, "metric": [0]}}

    dense_on_val = trial([0.5, 1.0], [1.0, 1.0], 0.1)
    sparse_on_val = trial([1.0, 0.95], [0.2, 0.2], 0.2)
    assert not is_sparse_trial(dense_on_val, 0.9) and is_sparse_trial(sparse_on_val, 0.9)
    assert selected([dense_on_val, sparse_on_val], 0.05, sparse=0.9) == [sparse_on_val]
    assert selected([dense_on_val, sparse_on_val], 0.05) == [dense_on_val]


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0, 5.0], [0.5, 0.5, 0.1], [0.1, 0.1, 0.5], [4.0]])
def test_expected_best_curve_is_exact(values) -> None:
    curve = expected_best_curve(values)
    for m in range(1, len(values) + 1):
        subsets = list(itertools.combinations(values, m))
        assert curve[m - 1] == pytest.approx(sum(min(s) for s in subsets) / len(subsets))
    assert _curve_matrix(np.array([values])).tolist()[0] == pytest.approx(curve)
    ties = values.count(min(values))  # the best is certain once every m-subset holds one of them
    assert trials_to_match(curve, min(values) + 1e-12) == len(values) - ties + 1
    assert trials_to_match(curve, min(values) - 1) is None


def test_curve_band_brackets_the_curve_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    reps = [{"trials": {"g": [{"val_loss": float(v)} for v in rng.random(6)]}} for _ in range(3)]
    dataset = {"replicates": reps}
    mean, low, high = curve_band(dataset, "g")
    assert len(mean) == 6 and all(lo <= m + 1e-9 and m <= hi + 1e-9 for m, lo, hi in zip(mean, low, high))
    assert curve_band(dataset, "g") == (mean, low, high)


def test_same_config_gives_identical_results_except_timing() -> None:
    cfg = replace(CometConfig.quick(), gates=("topk", "hash+", "comet+"), datasets=("synthetic",))
    first, second = run_comet(cfg), run_comet(cfg)
    assert json.dumps(without_timing(first), sort_keys=True) == json.dumps(without_timing(second), sort_keys=True)


def test_unknown_gate_is_a_user_error(tmp_path, capsys) -> None:
    assert main(["reproduce", "comet", "--quick", "--gates", "topk,moe", "--out", str(tmp_path / "x")]) == 2
    assert "unknown gates/datasets ['moe']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bench_comet_quick_runs(tmp_path) -> None:
    """The speed benchmark runs on tiny shapes and writes its table; ratios are not asserted here."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_comet.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--reps", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "bench_comet_quick.json").read_text())["rows"]
    assert {(r["gate"], r["state"]) for r in rows} == {
        (g, s) for g in ("comet", "dselect") for s in ("saturated", "soft (init)")
    }
    saturated = [r for r in rows if r["state"] == "saturated"]
    assert all(r["experts_run_per_token"] <= 2 for r in saturated)
    assert "| comet | saturated |" in (tmp_path / "bench_comet_quick.md").read_text()


@pytest.mark.parametrize("gates", ["comet+,hash", "hash,hash+"])
def test_report_works_with_any_subset_of_gates(tmp_path: Path, gates: str) -> None:
    """Regression: ``--gates comet+,hash`` failed with "error: topk" (the comparisons assumed a top-k run);
    every section renders for a subset, and the report names the claimed baselines that were not run."""
    from moekit.experiments.comet_report import SECTIONS

    out = tmp_path / "run"
    args = ["--gates", gates, "--datasets", "synthetic", "--replicates", "0", "--out", str(out)]
    assert main(["reproduce", "comet", "--quick", "--quiet", *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["datasets"]["synthetic"]["replicates"][0]["trials"]) == gates.split(",")
    rendered = {name: section(results) for name, section in SECTIONS.items()}
    report = (out / "report.md").read_text()
    assert "## Against the paper's claims" in report and rendered["comparisons"] in report
    if "comet+" in gates:
        assert "not run here, so not compared: top-k, DSelect-k." in report
        assert "local search lowers" not in report
    else:
        assert "COMET+ not run here" in report and "local search lowers hash's tuning curve" in report
