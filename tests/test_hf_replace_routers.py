"""``moekit.integrations.hf.replace_routers``: moekit routers and balancers inside Hugging Face MoE models,
trained by ``transformers.Trainer``, saved and reloaded with moekit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_model, token_batches

from moekit.integrations.hf import load_hf_model, replace_routers, routing_sources, save_hf_model
from moekit.integrations.hf.replace import gates
from moekit.losses import switch_aux

FUSED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.mark.parametrize("family", FUSED)
def test_topk_takes_over_the_stock_router_exactly(family: str) -> None:
    model = tiny_model(family)
    ids = token_batches(1)[0]
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        replace_routers(model, "topk")
        moekit_routed = model(input_ids=ids).logits
    assert len(gates(model)) == 2
    torch.testing.assert_close(moekit_routed, stock, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ["comet", "dselect"])
def test_training_loss_is_the_lm_loss_plus_the_weighted_balancing_terms(router: str) -> None:
    model = tiny_model("qwen3_moe")
    replace_routers(model, router, aux_weights={"switch": 0.5, "entropy_reg": 0.25}, router_kwargs={"gamma": 2.0})
    model.train()
    ids = token_batches(1)[0]
    out = model(input_ids=ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    decisions = [g.last_decision for g in gates(model).values()]
    expected = lm + sum(0.5 * switch_aux(d) + 0.25 * d.aux["entropy_reg"] for d in decisions)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for gate in gates(model).values():  # the balancing terms and the LM loss reach every router
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.router.parameters())
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, lm.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "router", "options"), [
    ("qwen3_moe", "comet", {"aux_weights": {"entropy_reg": 1e-3, "switch": 1e-2}}),
    ("mixtral", "dselect", {"aux_weights": {"importance": 1e-2}}),
    ("mixtral", "topk", {"balancer": "aux_free", "balancer_kwargs": {"rate": 0.05}, "aux_weights": {"z": 1e-3}}),
])  # fmt: skip
def test_trainer_fine_tunes_then_moekit_reloads_identical_logits(tmp_path: Path, family: str, router: str,
                                                                 options: dict) -> None:  # fmt: skip
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = replace_routers(tiny_model(family), router, **options)
    before = {n: p.detach().clone() for g in gates(model).values() for n, p in g.router.state_dict().items()}
    rows = [{"input_ids": ids, "labels": ids} for batch in token_batches(2, batch=4) for ids in batch]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows).train()
    after = {n: p.detach() for g in gates(model).values() for n, p in g.router.state_dict().items()}
    assert any(not torch.equal(before[n], after[n]) for n in before), "training left the routers unchanged"
    if "balancer" in options:
        assert any(n.endswith("balancer.bias") and after[n].abs().sum() > 0 for n in after)

    model.eval()
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_hf_model(model, tmp_path / "saved")
    reloaded = load_hf_model(tmp_path / "saved").eval()
    assert type(next(iter(gates(reloaded).values())).router) is type(next(iter(gates(model).values())).router)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"moekit\.load_hf_model"):  # stock transformers would re-draw the routers
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert "replace_routers" in (tmp_path / "saved" / "README.md").read_text()


def test_routing_recorder_reports_the_moekit_decisions() -> None:
    from moekit import RoutingRecorder

    model = replace_routers(tiny_model("olmoe"), "comet", k=2).eval()
    with RoutingRecorder(model, sources=routing_sources(model)) as rec, torch.no_grad():
        model(input_ids=token_batches(1)[0])
    metrics = rec.metrics()
    assert set(metrics) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for name, gate in gates(model).items():
        assert metrics[name.rsplit(".", 1)[0]].tokens == gate.last_decision.num_tokens == 4 * 16


def test_bad_requests_name_the_argument_and_what_is_allowed() -> None:
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"router must be one of \['topk', 'comet', 'dselect'\], got 'hash'"):
        replace_routers(model, "hash")
    with pytest.raises(ValueError, match=r"balancer='aux_free' .* 'comet' does not make; balance it with aux_weights"):
        replace_routers(model, "comet", balancer="aux_free")
    with pytest.raises(ValueError, match=r"balancer must be one of \['aux_free', 'mean', 'relative'\]"):
        replace_routers(model, "topk", balancer="loud")
    with pytest.raises(ValueError, match=r"aux_weights names \['nope'\].* terms of the 'dselect' router \(entropy_reg"):
        replace_routers(model, "dselect", aux_weights={"nope": 1.0})
    with pytest.raises(ValueError, match="router_kwargs must hold JSON values"):
        replace_routers(model, "topk", router_kwargs={"noisy": object()})
    assert not gates(model)  # nothing was replaced by a refused call
    replace_routers(model, "topk")
    with pytest.raises(ValueError, match="already has a moekit router"):
        replace_routers(model, "comet")
    with pytest.raises(ValueError, match=r"supports the top-k router families .* not switch_transformers"):
        replace_routers(tiny_model("switch_transformers"), "topk")
