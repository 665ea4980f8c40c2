"""``moekit reproduce smear``: the quick run end to end, its statistics, determinism and bad input."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moekit.cli.main import main
from moekit.experiments.common import without_timing
from moekit.experiments.smear import METHODS, SmearConfig, load_seed_data, run_smear
from moekit.experiments.smear_report import claims, paired


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smear") / "run"
    assert main(["reproduce", "smear", "--quick", "--quiet", "--seeds", "0,1", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_a_consistent_report(quick_run: Path, assert_pngs_readable) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert results["smoke_run"] is True and results["command"] == "moekit reproduce smear --quick --seeds 0,1"
    assert results["config"]["threads"] == 1 and results["environment"]["torch_threads"] == 1
    assert results["environment"]["versions"]["torch"] == torch.__version__
    cfg = SmearConfig.quick()
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in METHODS]
    D = len(cfg.domains)
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and len(r["per_domain"]) == D and len(r["sites"]) == 8
        assert r["best_epoch"] == 1 and len(r["val_curve"]) == 1 and r["trainable_params"] > r["adapter_params"] > 0
        assert "train_s" not in r and "infer_ms_per_1k" not in r  # wall-clock lives under "timing" only
        assert set(results["timing"]["runs"][f"{r['method']}/s{r['seed']}"]) == {"train_s", "infer_ms_per_1k"}
        if r["method"].startswith("dense_") or r["seed"] == 1:
            assert r["routing"] == {}  # one expert, or not the first seed
        else:
            assert set(r["routing"]) == set(r["sites"])
            for table in r["routing"].values():
                assert len(table) == D and all(abs(sum(row) - 1) < 1e-4 for row in table)
    by = {(r["method"], r["seed"]): r for r in runs}
    assert by[("tag", 0)]["domain_expert_mi_bits"]["stages.0.0"] == pytest.approx(
        results["data"]["domain_entropy_bits"], abs=1e-6)  # fmt: skip
    assert by[("smear_2x", 0)]["num_experts"] == 2 * by[("smear", 0)]["num_experts"]
    assert by[("dense_1x_params", 0)]["adapter_params"] > by[("dense_1x_compute", 0)]["adapter_params"]
    report = (quick_run / "report.md").read_text()
    assert report.index("Smoke run") < report.index("## Setup") and "Smoke run: no verdicts." in report
    assert "supported" not in report and "contradicted" not in report and "inconclusive" not in report
    assert "| `smear` |" in report and "backbone only (zero-shot)" in report
    assert_pngs_readable(quick_run, expected=("accuracy.png", "routing_smear.png", "routing_methods.png"))


def test_paired_differences_and_claims_come_from_the_runs(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in results["runs"]}
    diff = paired(results, "smear", "tag", lambda r: r["accuracy"])
    assert diff.n == 2 and diff.estimate == pytest.approx(
        sum(acc[("smear", s)] - acc[("tag", s)] for s in (0, 1)) / 2)  # fmt: skip
    statements = [c.statement for c in claims(results)]
    assert len(statements) == 7 and "SMEAR beats tag (metadata) routing" in statements


def test_each_seed_draws_a_new_split_with_validation_digits_unseen() -> None:
    cfg = replace(SmearConfig(), num_train=None)
    a, b = load_seed_data(cfg, 0), load_seed_data(cfg, 1)
    for d in (a, b):
        train_digits, val_digits = d.fit.meta_train["digit_id"], d.fit.meta_test["digit_id"]
        assert not torch.isin(val_digits, train_digits).any()
        assert not torch.isin(d.test.meta_test["digit_id"], train_digits).any()
    assert not torch.equal(a.test.meta_test["digit_id"], b.test.meta_test["digit_id"])


def test_same_config_gives_identical_results_except_timing() -> None:
    cfg = replace(SmearConfig.quick(), methods=("smear", "top1", "latent_skills"))
    first, second = run_smear(cfg), run_smear(cfg)
    assert json.dumps(without_timing(first), sort_keys=True) == json.dumps(without_timing(second), sort_keys=True)
    assert first["timing"]["runs"].keys() == second["timing"]["runs"].keys()


def test_bad_configuration_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="unknown methods \\['nope'\\]"):
        run_smear(replace(SmearConfig.quick(), methods=("smear", "nope")))
    assert main(["reproduce", "smear", "--quick", "--seeds", "a,b", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--seeds must be comma-separated integers, got 'a,b'" in err and err.count("\n") == 1
    assert main(["reproduce", "smear", "--quick", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
