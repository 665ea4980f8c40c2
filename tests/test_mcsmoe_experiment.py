"""``moekit reproduce mcsmoe --quick`` runs end to end and writes a consistent report."""

import json
from pathlib import Path

from moekit.cli.main import main
from moekit.experiments.mcsmoe import VARIANTS, McSmoeConfig


def test_quick_experiment_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "mcsmoe"
    assert main(["reproduce", "mcsmoe", "--quick", "--quiet", "--out", str(out)]) == 0
    assert {"report.md", "results.json", "mcsmoe.png"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    rows, cfg = results["rows"], McSmoeConfig.quick()
    full = rows[0]
    assert full["label"] == "full SMoE" and full["experts_per_layer"] == [8] * cfg.depth
    for target in cfg.targets:
        mine = [r for r in rows if r["target"] == target]
        labels = {r["label"] for r in mine}
        assert {v.label for v in VARIANTS} <= labels and "MC-SMoE (M-SMoE + compression)" in labels
        assert len(mine) == len(VARIANTS) + sum(v.recover for v in VARIANTS) + 1
        for r in mine:
            assert sum(r["experts_per_layer"]) == target * cfg.depth
            assert r["params"] < full["params"] and r["val_bpb"] > 0
            if r["checkpoint_bytes"] is not None:
                assert r["checkpoint_bytes"] < full["checkpoint_bytes"]
        compressed = next(r for r in mine if r["label"].startswith("MC-SMoE"))
        msmoe = next(r for r in mine if r["label"] == "M-SMoE" and r["recovery"])
        assert compressed["expert_params"] < msmoe["expert_params"]
        assert compressed["flops_per_token"] < msmoe["flops_per_token"]
        merged_only = next(r for r in mine if r["label"] == "M-SMoE" and not r["recovery"])
        assert compressed["checkpoint_bytes"] is not None  # the packed model is saved and measured
        shrink = merged_only["checkpoint_bytes"] - compressed["checkpoint_bytes"]
        assert shrink > 3.5 * (merged_only["params"] - compressed["params"])  # fp32 values gone (minus a small index)
    report = (out / "report.md").read_text()
    assert "| M-SMoE |" in report and "val bpb" in report
