"""``moekit reproduce smear --quick`` runs every method end to end and writes a consistent report."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moekit.cli.main import main
from moekit.experiments.smear import SmearConfig, run_smear
from moekit.layers.baselines import ROUTED_METHODS


def test_quick_experiment_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "smear"
    assert main(["reproduce", "smear", "--quick", "--quiet", "--out", str(out)]) == 0
    assert {"report.md", "results.json", "routing_smear.png", "routing_methods.png", "accuracy.png"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    cfg = SmearConfig.quick()
    runs = results["runs"]
    assert [r["method"] for r in runs] == list(ROUTED_METHODS)
    D, E = len(cfg.domains), cfg.experts
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and len(r["per_domain"]) == D and len(r["sites"]) == 8
        assert r["train_s"] > 0 and r["infer_ms_per_1k"] > 0 and r["trainable_params"] > r["adapter_params"] > 0
        if r["method"].startswith("dense_"):
            assert r["routing"] == {}
        else:
            assert set(r["routing"]) == set(r["sites"])
            for table in r["routing"].values():
                assert len(table) == D and all(len(row) == E and abs(sum(row) - 1) < 1e-4 for row in table)
    by = {r["method"]: r for r in runs}
    assert by["tag"]["domain_expert_mi_bits"]["stages.0.0"] == pytest.approx(results["data"]["domain_entropy_bits"], abs=1e-6)
    assert by["hash"]["domain_expert_mi_bits"]["stages.0.0"] < 0.5
    assert by["dense_1x_params"]["adapter_params"] > by["dense_1x_compute"]["adapter_params"]
    assert by["smear"]["adapter_params"] == by["ensemble"]["adapter_params"]
    report = (out / "report.md").read_text()
    assert "| `smear` |" in report and "backbone only (zero-shot)" in report and "routing_smear.png" in report


def test_bad_configuration_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="unknown methods \\['nope'\\]"):
        run_smear(replace(SmearConfig.quick(), methods=("smear", "nope")), None, quiet=True)
    assert main(["reproduce", "smear", "--quick", "--seeds", "a,b", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
