"""The main job runs end to end in quick mode and writes a readable report."""

import json

from moekit.cli.main import main


def test_demo_quick_writes_report(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--routers", "topk,hash", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| configuration |" in report and "utilisation.png" in report
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["results"]]
    assert labels == ["top-2, no balancing", "top-2 + importance + load", "top-2 + aux-free bias", "hash (example id)"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["results"])
    assert results["results"][0]["accuracy"] > 0.5  # two epochs already learn the digits
    assert (out / "utilisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc" in capsys.readouterr().out
