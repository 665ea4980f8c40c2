"""``moekit analyze`` on everything moekit saves or reads: every model kind, expert-parallel
checkpoints, Hugging Face MoE directories, models with adapters, experiment run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moekit
from moekit.analysis import EvalSet
from moekit.cli.main import main
from test_analysis import _all_pngs_ok


def _analyze(tmp_path: Path, source: Path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / f"report-{source.name}"
    assert main(["analyze", str(source), "--out", str(out), "--quiet", *extra]) == 0
    _all_pngs_ok(out)
    return (out / "report.md").read_text(), json.loads((out / "analysis.json").read_text())


def test_language_model_on_token_ids_says_which_tokens_each_expert_takes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = moekit.MoELM(dim=16, depth=2, heads=2, max_seq_len=32, num_experts=4, k=2, hidden=24)
    moekit.save_checkpoint(model, tmp_path / "lm")
    ids = torch.randint(0, 128, (12, 40), generator=torch.Generator().manual_seed(1))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    text, result = _analyze(tmp_path, tmp_path / "lm", "--calib", str(tmp_path / "ids.json"), "--no-interventions")
    assert "12 windows of 32 tokens (bytes) of token ids" in text  # cut to the model's context
    assert "bits per byte" in text and "over-represented character class" in text and "over-represented token" in text
    layer = result["layers"]["blocks.0.moe.router"]
    assert layer["tokens"] == 12 * 32 and set(layer["mutual_info"]) == {"label", "token"}
    assert len(layer["top_values"]["token"]) == 4 and result["label_name"] == "character class"
    assert main(["analyze", str(tmp_path / "lm"), "--calib", str(tmp_path / "ids.json"), "stdlib",
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip


def test_hugging_face_moe_directory_with_calibration_text(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "hf")
    (tmp_path / "notes.txt").write_text("def f(x):\n    return x + 1  # Adds One\n" * 40)
    text, result = _analyze(tmp_path, tmp_path / "hf", "--calib", str(tmp_path / "notes.txt"), "--calib-samples", "8",
                            "--seq-len", "24")  # fmt: skip
    assert "(mixtral)" in text and "bits per token" in text and "bytes % 256 (no tokenizer saved)" in text
    assert set(result["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert result["trained_k"] == 2 and sorted(result["metric_vs_k"]) == [str(k) for k in range(1, 7)]
    assert result["forced_expert_metric"] == {}  # forcing needs moekit routers; said under "Not shown"
    assert "forcing needs a moekit router" in text


def test_multitask_vector_and_expert_parallel_checkpoints_pick_fitting_data(tmp_path: Path) -> None:
    from moekit.distributed import save_distributed_checkpoint
    from moekit.distributed.model import ep_moe_classifier
    from moekit.models.multitask import MultiGateMoE

    tasks = [{"name": "a", "kind": "regression", "num_outputs": 1}, {"name": "b", "kind": "regression", "num_outputs": 1}]
    moekit.save_checkpoint(MultiGateMoE(100, tasks, num_experts=4, router="topk", router_kwargs={"k": 2}), tmp_path / "mmoe")
    text, result = _analyze(tmp_path, tmp_path / "mmoe", "--max-examples", "64", "--no-interventions")
    assert "synthetic regression tasks" in text and result["metric_name"] == "mean task MSE"
    assert set(result["layers"]) == {"gates.0", "gates.1"} and not result["higher_is_better"]
    config = {"in_dim": 64, "num_classes": 10, "dim": 16, "num_experts": 4, "router_kwargs": {"k": 2}}
    save_distributed_checkpoint(ep_moe_classifier(**config), tmp_path / "ep", name="ep_moe_classifier", config=config)
    text, result = _analyze(tmp_path, tmp_path / "ep", "--max-examples", "100", "--no-interventions")
    assert "test digits of scikit-learn" in text and result["metric_name"] == "accuracy"
    assert "NMI digit" in text


def test_adapters_with_tag_routing_specialise_on_the_domain(tmp_path: Path) -> None:
    from moekit.models.resnet_moe import BasicBlock

    torch.manual_seed(0)
    model = moekit.ResNetMoE(10, in_channels=1, width=4)
    moekit.insert_routed_adapters(model, BasicBlock, method="tag", num_experts=6, bottleneck=4, train=["head"])
    moekit.save_checkpoint(model, tmp_path / "adapted")
    text, result = _analyze(tmp_path, tmp_path / "adapted", "--data", "domain-digits", "--image-size", "8",
                            "--max-examples", "240", "--no-interventions")  # fmt: skip
    assert "with routed adapters (tag)" in text
    for layer in result["layers"].values():  # tag routing sends domain d to expert d: the domain tells the expert
        assert layer["mutual_info"]["domain"]["nmi"] == pytest.approx(1.0)
    assert (tmp_path / "report-adapted" / "group_domain.png").is_file()


def _run_dir(tmp_path: Path) -> Path:
    """An experiment directory in the documented layout: results.json runs with checkpoints and one eval set."""
    from moekit.models.classifier import MoEClassifier

    runs = tmp_path / "experiment"
    g = torch.Generator().manual_seed(0)
    data = EvalSet(torch.randn(40, 6, generator=g), torch.arange(40) % 3, class_names=("x", "y", "z"),
                   name="mine", description="40 vectors of my own", label_name="colour")  # fmt: skip
    runs.mkdir()
    data.save(runs / "eval_set.safetensors")
    entries = []
    for name in ("topk", "switch"):
        torch.manual_seed(0)
        model = MoEClassifier(6, 3, dim=8, num_experts=4, router=name, router_kwargs={"k": 2} if name == "topk" else {})
        moekit.save_checkpoint(model, runs / "checkpoints" / name)
        entries.append({"name": name, "checkpoint": f"checkpoints/{name}", "accuracy": 0.0})
    (runs / "results.json").write_text(json.dumps({"eval_set": "eval_set.safetensors", "runs": entries}))
    return runs


def test_experiment_directory_lists_runs_and_analyses_one(tmp_path: Path, capsys, monkeypatch) -> None:
    runs = _run_dir(tmp_path)
    assert main(["analyze", str(runs), "--list-runs"]) == 0
    listed = capsys.readouterr().out
    assert "topk\t" in listed and "switch\t" in listed and "saved evaluation set" in listed
    assert main(["analyze", str(runs)]) == 2
    assert "holds 2 runs; pick one with --run: topk, switch" in capsys.readouterr().err
    assert main(["analyze", str(runs), "--run", "nope"]) == 2
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "experiment", "--run", "switch", "--quiet"]) == 0
    out = tmp_path / "moekit-runs" / "analyze" / "experiment-switch"  # the default output root
    text = (out / "report.md").read_text()
    assert "Run `switch` of `experiment`" in text and "40 vectors of my own" in text and "NMI colour" in text
    _all_pngs_ok(out)


# ----- every experiment's output directory is analyzable (end to end, --quick runs)
def _reproduced_metric(results: dict, name: str) -> float:
    """The test metric the experiment reported for run ``name`` (COMET: mean over the tasks)."""
    run = next(r for r in results["runs"] if r["name"] == name)
    if results["experiment"] != "comet":
        return run["accuracy"]
    trial = results["datasets"][run["dataset"]]["replicates"][0]["trials"][run["gate"]][run["trial"]]
    return sum(trial["test"]["metric"]) / len(trial["test"]["metric"])


@pytest.mark.slow
@pytest.mark.parametrize(("command", "runs"), [
    (["demo", "--routers", "hash,expert_choice"], ["hash-example-id-s0", "expert-choice-s0"]),
    (["reproduce", "smear", "--methods", "smear,tag,dense_1x_compute"], ["smear-s0", "tag-s0"]),
    (["reproduce", "comet", "--datasets", "synthetic"], ["synthetic-comet-plus", "synthetic-hash"]),
], ids=["demo", "smear", "comet"])  # fmt: skip
def test_experiment_outputs_list_their_runs_and_analyze_reproduces_each_metric(tmp_path: Path, capsys, command,
                                                                               runs) -> None:  # fmt: skip
    out = tmp_path / "experiment"
    assert main([*command, "--quick", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["analyze", str(out), "--list-runs"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    if command[-1] == "synthetic":  # COMET: the best trial of every gate
        assert listed == [f"synthetic-{g.replace('+', '-plus')}" for g in results["config"]["gates"]]
    else:  # only routed models are saved (SMEAR's dense baselines have no router)
        assert sorted(listed) == sorted(runs)
    for name in runs:
        report = tmp_path / f"report-{name}"
        assert main(["analyze", str(out), "--run", name, "--out", str(report), "--quiet", "--no-interventions"]) == 0
        analysis = json.loads((report / "analysis.json").read_text())
        assert analysis["metric"] == pytest.approx(_reproduced_metric(results, name), abs=1e-6)
        assert analysis["layers"] and f"Run `{name}`" in (report / "report.md").read_text()
        _all_pngs_ok(report)


def test_comet_checkpoint_configs_rebuild_every_gate() -> None:
    """``gate_spec`` (what a saved COMET model's config says) builds what ``build_gate`` builds."""
    from moekit.experiments.comet import DATASETS, GATES, build_gate, gate_spec
    from moekit.registry import create_router

    spec, hp = DATASETS["synthetic"], {"lr": 1e-3, "gamma": 0.5}
    for gate in GATES:
        torch.manual_seed(0)
        built = build_gate(gate, hp, dim=12, spec=spec, num_keys=50, learn_steps=7, seed=3)
        name, kwargs = gate_spec(gate, hp, spec=spec, num_keys=50, learn_steps=7, seed=3)
        torch.manual_seed(0)
        rebuilt = create_router(name, dim=12, num_experts=spec.num_experts, **kwargs)
        assert type(rebuilt) is type(built), gate
        a, b = built.state_dict(), rebuilt.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), gate
        x = torch.randn(9, 12)
        meta = {"example_id": torch.arange(9)}
        built.eval(), rebuilt.eval()
        assert torch.equal(built(x, meta=meta).gates_TE(), rebuilt(x, meta=meta).gates_TE()), gate
