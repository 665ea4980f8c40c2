"""The main job (``moekit demo``) end to end in quick mode, and the training loop it runs on."""

import json

import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.data.digits import load_digits_split
from moekit.models.classifier import MoEClassifier
from moekit.training import TrainConfig, aux_loss, aux_terms, evaluate_classifier, train_classifier


def test_demo_quick_writes_report(tmp_path, capsys, assert_pngs_readable) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--routers", "softmax,topk,hash", "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == f"report written to {out}/report.md\n"  # --quiet: only the final path
    report = (out / "report.md").read_text()
    assert report.index("Smoke run") < report.index("## Results")
    assert "| configuration | test accuracy % [95% CI] | minus softmax (dense), points [95% CI] |" in report
    assert "![Expert utilisation](utilisation.png)" in report and "interval excludes 0" not in report
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "demo" and results["command"] == "moekit demo --quick --routers softmax,topk,hash --seeds 0,1"
    assert results["config"]["epochs"] == 2 and results["data"] == {"name": "sklearn digits", "train": 1347, "test": 450}
    rows = results["runs"]
    labels = ["softmax (dense)", "top-2, no balancing", "top-2 + importance + load", "top-2 + aux-free bias",
              "hash (example id)"]
    assert [(r["label"], r["seed"]) for r in rows] == [(label, s) for s in (0, 1) for label in labels]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["history"]) == 2 and "seconds" not in r["history"][0]
        assert sum(r["tokens_per_expert"]) == {"hash": 450, "softmax": 3600}.get(r["router"], 900)  # k slots per example
        assert 1 <= r["living_experts"] <= 8 and r["cv_counts"] >= 0
        assert results["timing"]["runs"][f"{r['label']}/s{r['seed']}"]["train_s"] > 0
    assert rows[0]["accuracy"] > 0.7  # two epochs already learn the digits
    assert "aux.importance" in rows[2]["history"][0] and "aux.load" in rows[2]["history"][0]
    assert_pngs_readable(out, expected=("utilisation.png",))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".moekit-output.json"]  # no temp files left
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging directory either


def test_demo_is_deterministic_except_timing() -> None:
    from moekit.experiments.common import without_timing
    from moekit.experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(routers=("topk", "expert_choice"), seeds=(3,), epochs=1)
    assert json.dumps(without_timing(run_demo(cfg))) == json.dumps(without_timing(run_demo(cfg)))


def test_digits_split_is_reproducible_and_standardised() -> None:
    a, b = load_digits_split(seed=3), load_digits_split(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, load_digits_split(seed=4).x_train)
    assert a.x_train.shape == (1347, 64) and a.x_test.shape == (450, 64)
    torch.testing.assert_close(a.x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    assert set(a.y_test.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_digits_split(test_fraction=1.5)


def _tiny_problem():
    torch.manual_seed(0)
    x = torch.randn(96, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes, learnable
    return x, y


def test_train_classifier_learns_and_is_reproducible() -> None:
    data = _tiny_problem()
    histories, params = [], []
    for _ in range(2):
        torch.manual_seed(1)
        model = MoEClassifier(6, 4, dim=16, num_experts=4, router="topk", router_kwargs={"k": 2})
        histories.append(train_classifier(model, data, epochs=8, lr=1e-2, batch_size=32, seed=5, progress=False,
                                          aux_weights={"importance": 0.1, "switch": 0.01}))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    h = histories[0]
    assert [e["epoch"] for e in h] == list(range(1, 9)) and h[-1]["loss"] < h[0]["loss"]
    assert {"loss", "task_loss", "aux.importance", "aux.switch", "seconds"} <= set(h[0])
    for e in h:  # the total is the task loss plus the weighted terms (means over the same batches)
        assert e["loss"] == pytest.approx(e["task_loss"] + 0.1 * e["aux.importance"] + 0.01 * e["aux.switch"], rel=1e-5)
    assert histories[0] == [{**e, "seconds": histories[0][i]["seconds"]} for i, e in enumerate(histories[1])]
    assert torch.equal(params[0], params[1])
    acc, outputs = evaluate_classifier(model, *data)
    assert acc > 0.6 and isinstance(outputs[0][0], moekit.MoEOutput)


def test_aux_terms_sum_layer_terms_and_registered_losses_over_blocks() -> None:
    model = MoEClassifier(6, 4, dim=8, depth=2, num_experts=4, router="comet", router_kwargs={"k": 2})
    _, outputs = model(torch.randn(10, 6))
    assert len(outputs) == 2 and "entropy_reg" in outputs[0].aux
    terms = aux_terms(outputs, {"entropy_reg": 1.0, "importance": 1.0})
    torch.testing.assert_close(terms["entropy_reg"], outputs[0].aux["entropy_reg"] + outputs[1].aux["entropy_reg"])
    imp = moekit.get_loss("importance")
    torch.testing.assert_close(terms["importance"], imp(outputs[0].decision) + imp(outputs[1].decision))
    torch.testing.assert_close(aux_loss(outputs, {"entropy_reg": 0.5, "importance": 2.0}),
                               0.5 * terms["entropy_reg"] + 2.0 * terms["importance"])


def test_reinforce_router_trains_through_its_policy_terms() -> None:
    data = _tiny_problem()
    model = MoEClassifier(6, 4, dim=8, num_experts=3, router="reinforce")
    before = model.blocks[0].router.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    train_classifier(model, data, epochs=1, batch_size=48, progress=False)
    after = model.blocks[0].router.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_hash_routing_by_example_id_through_meta_fn() -> None:
    data = _tiny_problem()
    model = MoEClassifier(6, 4, dim=8, num_experts=3, router="hash", router_kwargs={"num_keys": 96})
    history = train_classifier(model, data, epochs=1, progress=False, meta_fn=lambda idx: {"token_ids": idx})
    assert len(history) == 1
    _, (out,) = model(data[0][:4], meta={"token_ids": torch.arange(4)})
    assert torch.equal(out.decision.ids_TK[:, 0], model.blocks[0].router.table[:4, 0])


def test_train_config_round_trips_to_kwargs() -> None:
    cfg = TrainConfig(epochs=3, aux_weights={"z": 1e-3})
    assert cfg.kwargs() == {"epochs": 3, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.0,
                            "aux_weights": {"z": 1e-3}, "seed": 0}
