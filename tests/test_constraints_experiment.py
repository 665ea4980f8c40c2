"""``moekit reproduce constraints``: the quick run end to end, and bad configurations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moekit.cli.main import main
from moekit.experiments.common import without_timing
from moekit.experiments.constraints import ConstraintsConfig, constraint_kind, run_constraints
from moekit.experiments.constraints_report import claims, kind_means


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("constraints") / "run"
    assert main(["reproduce", "constraints", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_report_results_plots_and_checkpoints(quick_run: Path, assert_pngs_readable) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert results["smoke_run"] and results["command"] == "moekit reproduce constraints --quick"
    cfg = ConstraintsConfig.quick()
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"dense-s0"} | {f"p4-E4-{c}-s0" for c in cfg.constraints}
    assert set(results["timing"]["runs"]) == set(runs) and not any("train_seconds" in r for r in runs.values())
    for name, r in runs.items():
        assert (quick_run / r["checkpoint"] / "model.safetensors").is_file()
        assert 0.0 <= r["accuracy"] <= 1.0
        if name != "dense-s0":
            assert sorted(map(int, r["accuracy_vs_k"])) == [1, 2, 3, 4]
            assert r["accuracy_vs_k"]["2"] == pytest.approx(r["accuracy"])  # trained k = the routed model
            assert len(r["forced_expert_accuracy"]) == 4 and 1 <= r["living_experts"] <= 4
            assert len(r["plots"]["class_table"]) == 10 and len(r["plots"]["tsne"]) == len(r["plots"]["tsne_labels"])
    text = (quick_run / "report.md").read_text()
    assert "| relative | hard | 4 | 4 |" in text and "Smoke run: no verdicts." in text
    assert text.index("Smoke run") < text.index("## Setup") and "supported" not in text
    assert_pngs_readable(quick_run, expected=("claims.png", "accuracy_vs_k.png", "cv_importance.png",
                                              "class_tables.png", "coactivation.png", "tsne.png"))  # fmt: skip


def test_claims_pair_soft_and_hard_means_by_seed(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    soft = kind_means(results["runs"], "soft", "accuracy", 2)
    hard = kind_means(results["runs"], "hard", "accuracy", 2)
    by = {r["constraint"]: r["accuracy"] for r in results["runs"]}
    assert soft == {0: pytest.approx((by["importance"] + by["kl_uniform"]) / 2)}
    found = {c.statement: c for c in claims(results)}
    assert len(found) == 4
    accuracy = next(c for s, c in found.items() if s.startswith("hard constraints give higher accuracy"))
    assert accuracy.difference.estimate == pytest.approx(100 * (hard[0] - soft[0]) / 100) and accuracy.scale == 100


def test_same_config_gives_identical_results_except_timing() -> None:
    cfg = replace(ConstraintsConfig.quick(), constraints=("importance", "mean"), num_train=96, num_test=60)
    first, second = run_constraints(cfg), run_constraints(cfg)
    assert json.dumps(without_timing(first), sort_keys=True) == json.dumps(without_timing(second), sort_keys=True)


def test_analyze_reads_an_experiment_run(quick_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert main(["analyze", str(quick_run), "--run", "p4-E4-relative-s0", "--no-tsne", "--out", str(out)]) == 0
    results = json.loads((quick_run / "results.json").read_text())
    acc = next(r["accuracy"] for r in results["runs"] if r["name"] == "p4-E4-relative-s0")
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["metric"] == pytest.approx(acc)  # same data split, same model


def test_constraint_kinds() -> None:
    assert [constraint_kind(c) for c in ("importance", "kl_uniform", "load", "switch", "z", "entropy")] == ["soft"] * 6
    assert [constraint_kind(c) for c in ("relative", "mean", "aux_free", "none")] == ["hard", "hard", "bias", "none"]
    with pytest.raises(ValueError, match="unknown constraint 'magic'"):
        constraint_kind("magic")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"positions": (5,)}, "positions must be in 1..4"),
        ({"num_experts": (2,), "k": 3}, "k must be <= num_experts"),
        ({"constraints": ("importance", "magic")}, "unknown constraint"),
        ({"tau_relative": 0.0}, "tau_relative must be > 0"),
        ({"tau_mean": -1.0}, "tau_mean must be > 0"),
        ({"data": "cifar10"}, "needs data_dir"),
    ],
)
def test_bad_config_writes_nothing(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_constraints(replace(ConstraintsConfig.quick(), **change), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        run_constraints(ConstraintsConfig.quick(), tmp_path / "mine")
    with pytest.raises(FileExistsError, match="was not written by moekit"):
        run_constraints(ConstraintsConfig.quick(), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_bad_position_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", "constraints", "--positions", "0", "--out", str(tmp_path / "x")]) == 2
    assert "positions must be in 1..4, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_domain_metadata_gets_its_own_mutual_information() -> None:
    from moekit.experiments.constraints import load_images, run_one

    cfg = replace(ConstraintsConfig.quick(), data="domain-digits", num_train=96, num_test=120)
    data = load_images(cfg)
    assert set(data.meta_test["domain"].tolist()) == set(range(6))  # a random subset spans the domains
    result, _ = run_one(cfg, data, constraint="mean", position=4, num_experts=4, seed=0)
    assert set(result["nmi"]) == {"label", "domain"} and 0.0 <= result["nmi"]["domain"] <= 1.0
