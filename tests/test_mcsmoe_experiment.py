"""``moekit reproduce mcsmoe``: the quick run end to end, its held-out split, statistics and determinism."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli.main import main
from moekit.experiments.common import without_timing
from moekit.experiments.mcsmoe import VARIANTS, McSmoeConfig, heldout_split, model_names, run_mcsmoe
from moekit.experiments.mcsmoe_report import bpb, claims, costs, paired, per_seed_difference


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mcsmoe") / "run"
    assert main(["reproduce", "mcsmoe", "--quick", "--quiet", "--seeds", "0,1", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_a_consistent_report(quick_run: Path, assert_pngs_readable) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert results["smoke_run"] is True and results["command"] == "moekit reproduce mcsmoe --quick --seeds 0,1"
    assert results["config"]["threads"] == 1 and results["environment"]["torch_threads"] == 1
    cfg = McSmoeConfig.quick()
    assert results["models"] == ["full", "control", "msmoe_merge_only", *VARIANTS]
    assert [s["seed"] for s in results["seeds"]] == [0, 1]
    merged_layers = cfg.depth - 1
    for seed in results["seeds"]:
        assert len(seed["documents"]) == len(seed["bytes"]) == cfg.test_files
        models = seed["models"]
        assert list(models) == results["models"]
        full = models["full"]
        assert full["experts_per_layer"] == [cfg.num_experts] * cfg.depth
        assert models["control"]["params"] == full["params"]
        for name in VARIANTS:
            m = models[name]
            assert len(m["bits"]) == cfg.test_files and all(b > 0 for b in m["bits"])
            assert m["experts_per_layer"][0] == cfg.num_experts  # the first layer is kept whole
            assert sum(m["experts_per_layer"][1:]) == cfg.experts * merged_layers
            assert m["params"] < full["params"] and m["checkpoint_bytes"] < full["checkpoint_bytes"]
        assert models["uniform_budget"]["experts_per_layer"][1:] == [cfg.experts] * merged_layers
        assert models["mcsmoe"]["expert_params"] < models["msmoe"]["expert_params"]
        assert models["mcsmoe"]["flops_per_token"] < models["msmoe"]["flops_per_token"]
        assert models["mcsmoe"]["checkpoint_bytes"] < models["msmoe"]["checkpoint_bytes"]  # packed: only kept rows
        assert models["msmoe_merge_only"]["bits"] != models["msmoe"]["bits"]  # recovery changed the model
        assert "merge_s" not in models["msmoe"]  # wall-clock lives under "timing" only
    assert {"train_s", "msmoe/merge_s", "msmoe/recover_s", "msmoe/eval_s", "control/recover_s"} <= set(
        results["timing"]["seeds"]["0"])  # fmt: skip
    report = (quick_run / "report.md").read_text()
    assert report.index("Smoke run") < report.index("## Setup") and "Smoke run: no verdicts." in report
    assert "supported" not in report and "contradicted" not in report and "inconclusive" not in report
    assert "| M-SMoE |" in report and "| full SMoE |" in report
    assert_pngs_readable(quick_run, expected=("bpb.png", "size_quality.png"))


def test_paired_differences_come_from_the_documents(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    seeds = results["seeds"]
    by_hand = [sum(s["models"]["msmoe"]["bits"]) / sum(s["bytes"]) - sum(s["models"]["prune"]["bits"]) / sum(s["bytes"])
               for s in seeds]  # fmt: skip
    diff = paired(results, "msmoe", "prune")
    assert diff.n == 2 and diff.estimate == pytest.approx(np.mean(by_hand))
    within = per_seed_difference(seeds[0], "msmoe", "prune")
    assert within.n == len(seeds[0]["documents"]) and within.estimate == pytest.approx(by_hand[0])
    assert within.low <= within.estimate <= within.high
    found = claims(results)
    assert [c.claimed for c in found] == ["negative"] * 6 and {c.difference.n for c in found} == {2}
    assert found[0].difference.estimate == pytest.approx(diff.estimate)
    cost = costs(results)[0]
    assert cost.difference.estimate == pytest.approx(np.mean([bpb(s, "msmoe") - bpb(s, "control") for s in seeds]))


def test_heldout_split_is_new_per_seed_and_disjoint_from_training() -> None:
    cfg = McSmoeConfig.quick()
    a, again, b = heldout_split(cfg, 0), heldout_split(cfg, 0), heldout_split(cfg, 1)
    assert a.heldout.digest == again.heldout.digest and torch.equal(a.train, again.train)
    assert {d.id for d in a.heldout.documents} != {d.id for d in b.heldout.documents}
    train = bytes(a.train.numpy())
    for doc in a.heldout.documents:
        assert cfg.doc_bytes - 4 <= len(doc) <= cfg.doc_bytes and doc.text.decode("utf-8")  # whole characters
        assert doc.text not in train  # the span's file is not training text
    assert len(a.heldout.documents) == cfg.test_files == len({d.id for d in a.heldout.documents})


def test_same_command_gives_the_same_json() -> None:
    cfg = replace(McSmoeConfig.quick(), variants=("msmoe", "mcsmoe"), train_steps=8)
    first, second = run_mcsmoe(cfg), run_mcsmoe(cfg)
    assert json.dumps(without_timing(first), sort_keys=True) == json.dumps(without_timing(second), sort_keys=True)
    assert model_names(cfg) == ["full", "control", "msmoe_merge_only", "msmoe", "mcsmoe"]


@pytest.mark.parametrize("change, match", [
    ({"variants": ("nope",)}, r"unknown variants \['nope'\]"),
    ({"seeds": (0, 0)}, "seeds must be distinct"),
    ({"experts": 9}, "experts must be <= num_experts=8, got 9"),
    ({"doc_bytes": 40}, "doc_bytes must be >= 2 \\* seq_len = 64, got 40"),
    ({"anchor": "last"}, "anchor must be 'first', 'dominant' or an expert id"),
    ({"test_files": 10_000}, "test_files=10000 needs more corpus files"),
])  # fmt: skip
def test_bad_configs_are_refused_before_any_work(change: dict, match: str) -> None:
    cfg = replace(McSmoeConfig.quick(), **change)
    with pytest.raises(ValueError, match=match):
        cfg.check()
        heldout_split(cfg, 0)


def test_report_command_rebuilds_the_run_report_and_document_blocks(quick_run: Path, tmp_path: Path) -> None:
    from moekit.experiments.mcsmoe_report import SECTIONS
    from moekit.reporting_docs import stale_blocks

    out = tmp_path / "again"
    assert main(["report", str(quick_run / "results.json"), "--out", str(out), "--quiet"]) == 0
    assert (out / "report.md").read_text() == (quick_run / "report.md").read_text()
    doc = tmp_path / "page.md"
    (tmp_path / "r.json").write_bytes((quick_run / "results.json").read_bytes())
    doc.write_text("".join(f"<!-- moekit:generated source=r.json section={s} images=img -->\n<!-- /moekit:generated -->\n"
                           for s in SECTIONS))  # fmt: skip
    assert main(["report", "--doc", str(doc), "--quiet"]) == 0
    assert not stale_blocks(doc) and (tmp_path / "img" / "bpb.png").is_file()
    assert "Smoke run: no verdicts." in doc.read_text()
