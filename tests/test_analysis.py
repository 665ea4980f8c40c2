"""Routing analysis: known answers on constructed routings, interventions, Hugging Face models,
reports (atomic) and ``moekit analyze``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from moekit import HashRouter, MLPExperts, MoE, ResNetMoE, TopKRouter, save_checkpoint
from moekit.analysis import (
    accuracy_vs_k,
    analyze_layer,
    analyze_model,
    class_expert_table,
    collect_routing,
    embed_logits,
    force_expert,
    forced_expert_accuracy,
    inference_k,
    mutual_information,
    write_analysis_report,
)
from moekit.cli.main import main

C = 4  # classes = experts


class ClassRouted(nn.Module):
    """One MoE layer whose router is built to send class c (one-hot input c) to expert c; the head
    reads the input back, so the model is right iff its experts pass the class through."""

    def __init__(self, scale: float = 10.0, k: int = 1) -> None:
        super().__init__()
        self.moe = MoE(TopKRouter(C, C, k, noisy=False), MLPExperts(C, C, 8))
        with torch.no_grad():
            self.moe.router.gate.weight.copy_(scale * torch.eye(C))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        out = self.moe(x)
        return x + 0 * out.y, [out]


def class_batches(n_per_class: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    y = torch.arange(C).repeat(n_per_class)
    x = torch.nn.functional.one_hot(y, C).float() + 0.01 * torch.rand(len(y), C)  # positive noise
    return [(x[:20], y[:20]), (x[20:], y[20:])]


def test_mutual_information_known_answers() -> None:
    assert mutual_information(torch.eye(4) * 5) == pytest.approx(math.log(4))
    assert mutual_information(torch.ones(3, 5)) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.tensor([[2.0, 0.0], [1.0, 1.0]])) > 0


def test_class_to_own_expert_has_maximal_mi_and_balanced_use() -> None:
    model = ClassRouted()
    parity = lambda b: {"parity": b[1] % 2}  # noqa: E731
    record = collect_routing(model, class_batches(), labels=lambda b: b[1], metadata=parity)
    ((name, layer),) = record.layers.items()
    a = analyze_layer(layer)
    assert name == "moe.router" and a.tokens == 4 * 10
    assert a.mutual_info["label"]["mi"] == pytest.approx(math.log(C))
    assert a.mutual_info["label"]["nmi"] == pytest.approx(1.0)
    assert a.mutual_info["parity"]["nmi"] == pytest.approx(1.0)  # parity is a function of the expert too
    torch.testing.assert_close(a.class_table, torch.eye(C))
    assert a.cv_importance == pytest.approx(0.0, abs=1e-9) and a.cv_counts == pytest.approx(0.0, abs=1e-9)
    assert a.living_experts == C
    torch.testing.assert_close(a.coactivation, torch.eye(C) * 10)


def test_collapsed_router_has_zero_mi_and_one_living_expert() -> None:
    model = ClassRouted()
    with torch.no_grad():
        model.moe.router.gate.weight.zero_()
        model.moe.router.gate.weight[0] = 100.0  # every token's largest logit is expert 0
    a = analyze_layer(next(iter(collect_routing(model, class_batches(), labels=lambda b: b[1]).layers.values())))
    assert a.mutual_info["label"]["mi"] == pytest.approx(0.0, abs=1e-12)
    assert a.living_experts == 1
    assert a.cv_counts == pytest.approx(math.sqrt(C - 1))  # the largest possible CV


def test_class_expert_table_means() -> None:
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    table = class_expert_table(gates, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(table[0], torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert torch.isnan(table[1]).all()


def test_force_expert_and_inference_k_restore_themselves() -> None:
    model = ClassRouted(k=2)
    x = class_batches()[0][0]
    with force_expert(model, 3):
        d = model(x)[1][0].decision
        assert (d.ids_TK == 3).all() and (d.weights_TK == 1).all()
    assert not (model(x)[1][0].decision.ids_TK == 3).all()
    with pytest.raises(RuntimeError):
        with inference_k(model, 4):
            assert model(x)[1][0].decision.k == 4
            raise RuntimeError("inside")
    assert model.moe.router.k == 2
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        with inference_k(model, 5):
            pass
    with pytest.raises(ValueError, match="expert must be <= 3"):
        with force_expert(model, 4):
            pass
    assert model.moe.router.k == 2 and not model.moe.router._forward_hooks


def test_inference_k_rejects_non_topk_routers() -> None:
    model = MoE(HashRouter(4, 4, num_keys=16), MLPExperts(4, 4, 8))
    with pytest.raises(ValueError, match="cannot change k"):
        with inference_k(model, 2):
            pass


def test_accuracy_vs_k_and_forced_experts_call_evaluate() -> None:
    model = ClassRouted()
    batches = class_batches()

    def share_routed_to_own_expert(m: nn.Module) -> float:  # 1.0 when every token's first slot is its class
        hits = sum(int((m(x)[1][0].decision.ids_TK[:, 0] == y).sum()) for x, y in batches)
        return hits / 40

    assert accuracy_vs_k(model, share_routed_to_own_expert, [1, 2, 4]) == {1: 1.0, 2: 1.0, 4: 1.0}
    assert forced_expert_accuracy(model, share_routed_to_own_expert, layer="moe.router") == [0.25] * 4
    with pytest.raises(ValueError, match="not found"):
        forced_expert_accuracy(model, share_routed_to_own_expert, layer="nope")


def test_embed_logits() -> None:
    emb = embed_logits(torch.randn(30, 4), max_points=20)
    assert emb.shape == (20, 2)
    with pytest.raises(ValueError, match="at least 5"):
        embed_logits(torch.randn(3, 4))


def test_model_without_routers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no moekit router"):
        collect_routing(nn.Linear(3, 3), [torch.randn(2, 3)])


def test_hugging_face_model() -> None:
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model

    model = tiny_model("mixtral")
    ids = torch.randint(3, 200, (2, 6))
    batches = [(ids, torch.arange(2))]
    forward = lambda m, b: m(input_ids=b[0])  # noqa: E731
    result = analyze_model(model, batches, forward=forward, labels=lambda b: b[1], tsne=False)
    assert set(result.layers) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    layer = result.layers["model.layers.0.mlp"]
    assert layer.tokens == 12 and int(layer.counts.sum()) == 12 * 2  # top-2 of 6 experts
    assert result.trained_k == 2
    with inference_k(model, 1):
        one = analyze_model(model, batches, forward=forward, tsne=False)
    assert int(one.layers["model.layers.0.mlp"].counts.sum()) == 12
    assert model.model.layers[0].mlp.gate.top_k == 2
    with pytest.raises(ValueError, match="moekit router"):
        with force_expert(model, 0):
            pass


def _png_ok(path: Path) -> None:
    """A PNG that a person can read: a real size and not blank (pixels vary)."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8).float()
    assert width >= 300 and height >= 200, f"{path.name} is only {width}x{height}"
    assert float(pixels.std()) > 10 and float((pixels < 200).float().mean()) > 0.01, f"{path.name} looks blank"


def _all_pngs_ok(out: Path) -> list[str]:
    names = sorted(p.name for p in out.glob("*.png"))
    assert names
    for name in names:
        _png_ok(out / name)
    text = (out / "report.md").read_text()
    assert all(f"({n})" in text for n in names), "every PNG is shown in the report"
    return names


def test_report_is_complete_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ClassRouted(k=2)
    batches = class_batches()
    evaluate = lambda m: 0.5  # noqa: E731
    result = analyze_model(model, batches, labels=lambda b: b[1], evaluate=evaluate, class_names=["a", "b", "c", "d"],
                           metadata=lambda b: {"parity": b[1] % 2})  # fmt: skip
    assert sorted(result.metric_vs_k) == [1, 2, 3, 4] and len(result.forced["moe.router"]) == 4
    out = write_analysis_report(result, tmp_path / "report", title="t")
    names = set(_all_pngs_ok(out))
    assert {"utilisation.png", "load_over_data.png", "entropy.png", "coactivation.png", "class_table.png",
            "group_parity.png", "tsne_0.png", "metric_vs_k.png", "forced_experts.png"} <= names  # fmt: skip
    text = (out / "report.md").read_text()
    assert "NMI label" in text and "One expert forced" in text and "What each expert takes" in text
    with pytest.raises(FileExistsError):
        write_analysis_report(result, out, title="t")
    import moekit.analysis.report as report

    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_forced_experts", boom)
    with pytest.raises(RuntimeError):
        write_analysis_report(result, tmp_path / "other", title="t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # nothing half-written


def test_load_shares_and_top_values_known_answers() -> None:
    from moekit.analysis.metrics import expert_top_values, load_shares

    gates = torch.zeros(8, 2)
    gates[:4, 0] = 1.0  # the first half of the data goes to expert 0, the second to expert 1
    gates[4:, 1] = 1.0
    torch.testing.assert_close(load_shares(gates, slices=2), torch.eye(2))
    assert load_shares(gates, slices=16).shape == (4, 2)
    choice = torch.tensor([0] * 6 + [1] * 6)
    values = torch.tensor([5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7, 7])
    top = expert_top_values(choice, values, 2)
    assert top[0][0] == {"value": 5, "count": 3, "share": 0.5, "lift": pytest.approx(2.0)}
    assert [t["value"] for t in top[1]] == [7]


def test_eval_set_round_trip_and_token_classes(tmp_path: Path) -> None:
    from moekit.analysis import CHAR_CLASSES, EvalSet, char_class

    assert [CHAR_CLASSES[char_class(t)] for t in (" ", "\n", "a", " the", "Q", "7", ";", "é")] == [
        "space", "newline", "lowercase", "lowercase", "uppercase", "digit", "punctuation", "other"]
    data = EvalSet.from_tokens(torch.tensor([list(b"ab 1"), list(b"\nZ;\xc3")]), description="bytes")
    assert data.kind == "tokens" and data.label_name == "character class"
    assert [CHAR_CLASSES[c] for c in data.labels[1].tolist()] == ["newline", "uppercase", "punctuation", "other"]
    assert data.group_names["token"][ord("a")] == "'a'" and data.group_names["token"][0xC3] == "0xc3"
    images = EvalSet(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), route_meta={"tag": torch.arange(4)},
                     groups={"domain": torch.tensor([0, 0, 1, 1])}, class_names=("a", "b"), name="mine")  # fmt: skip
    for original in (data, images):
        loaded = EvalSet.load(original.save(tmp_path / f"{original.name}.safetensors"))
        assert torch.equal(loaded.inputs, original.inputs) and torch.equal(loaded.labels, original.labels)
        assert loaded.groups.keys() == original.groups.keys() and loaded.class_names == original.class_names
        assert loaded.route_meta.keys() == original.route_meta.keys() and loaded.kind == original.kind
    assert "2 of them analysed" in images.take(slice(0, 2)).description
    with pytest.raises(ValueError, match=r"labels has shape \(3,\); the inputs have 4 examples"):
        EvalSet(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    (tmp_path / "other.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        EvalSet.load(tmp_path / "other.safetensors")


def test_cli_analyze_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = ResNetMoE(10, width=4, moe_position=4, num_experts=4, k=2)
    save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "analysis"
    args = ["analyze", str(tmp_path / "ckpt"), "--image-size", "8", "--max-examples", "60", "--out", str(out)]
    assert main(args) == 0
    text = (out / "report.md").read_text()
    assert "stages.3.router" in text and "accuracy against inference-time k" in text
    assert "the 450 test images of scikit-learn's digits upscaled to 3x8x8; 60 of them analysed" in text
    _all_pngs_ok(out)
    assert main(args) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert main(["analyze", str(tmp_path / "ckpt"), "--calib", "stdlib", "--out", str(tmp_path / "x")]) == 2
    assert "--calib is for language models; ResNetMoE takes images" in capsys.readouterr().err
