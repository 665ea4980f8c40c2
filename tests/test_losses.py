"""Balancing losses: hand-computed values, gradients, and equality with Hugging Face transformers
(Mixtral's load-balancing loss, and a Mixtral sparse block / experts with copied weights)."""

import math

import pytest
import torch

import moekit
from moekit import losses
from moekit.types import RoutingDecision


def make(ids, weights, E, logits=None, kept=None) -> RoutingDecision:
    logits = None if logits is None else torch.as_tensor(logits, dtype=torch.float32)
    probs = None if logits is None else torch.softmax(logits, -1)
    kept = None if kept is None else torch.as_tensor(kept)
    return RoutingDecision(torch.as_tensor(ids), torch.as_tensor(weights, dtype=torch.float32), E, logits, probs, kept)


def test_importance_cv2_by_hand() -> None:
    d = make([[0], [0], [1]], [[0.5], [1.0], [1.0]], 3)  # importance = [1.5, 1, 0]
    imp = torch.tensor([1.5, 1.0, 0.0])
    assert math.isclose(float(losses.importance_cv2(d)), float(imp.var(correction=0) / imp.mean() ** 2), rel_tol=1e-6)
    assert float(losses.importance_cv2(make([[0], [1], [2]], [[1.0]] * 3, 3))) == 0.0  # balanced
    assert float(losses.cv_squared(torch.tensor([5.0]))) == 0.0  # one expert


def test_dropped_slots_do_not_count() -> None:
    d = make([[0, 1], [0, 1]], [[0.5, 0.5]] * 2, 2, kept=[[True, False], [True, False]])
    assert d.counts().tolist() == [2.0, 0.0]
    assert math.isclose(float(losses.load_cv2(d)), 1.0, rel_tol=1e-6)  # counts [2, 0]: var 1, mean 1
    assert math.isclose(float(losses.importance_cv2(d)), 1.0, rel_tol=1e-6)


def test_kl_to_uniform_by_hand() -> None:
    d = make([[0], [1], [1], [1]], [[1.0]] * 4, 2)  # p = [0.25, 0.75]
    expected = 0.25 * math.log(0.25 * 2) + 0.75 * math.log(0.75 * 2)
    assert math.isclose(float(losses.kl_to_uniform(d)), expected, rel_tol=1e-6)
    assert math.isclose(float(losses.kl_to_uniform(make([[0], [1]], [[1.0]] * 2, 2))), 0.0, abs_tol=1e-7)


def test_z_and_entropy_by_hand() -> None:
    logits = [[0.0, 0.0], [1.0, 2.0]]
    d = make([[0], [1]], [[1.0], [1.0]], 2, logits)
    lse = torch.logsumexp(torch.tensor(logits), -1)
    assert math.isclose(float(losses.z_loss(d)), float(lse.pow(2).mean()), rel_tol=1e-6)
    p = torch.softmax(torch.tensor(logits), -1)
    assert math.isclose(float(losses.entropy(d)), float(-(p * p.log()).sum(-1).mean()), rel_tol=1e-6)


def test_switch_aux_by_hand_and_minimum_at_balance() -> None:
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    d = make([[0], [0], [1]], [[1.0]] * 3, 2, logits)
    p = torch.softmax(logits, -1).mean(0)
    assert math.isclose(float(losses.switch_aux(d)), 2 * (2 / 3 * float(p[0]) + 1 / 3 * float(p[1])), rel_tol=1e-6)
    uniform = make([[0], [1]], [[1.0]] * 2, 2, torch.zeros(2, 2))
    assert math.isclose(float(losses.switch_aux(uniform)), 1.0, rel_tol=1e-6)  # E * sum_e (1/E)(1/E)


def test_losses_that_need_logits_say_so() -> None:
    d = make([[0], [1]], [[1.0]] * 2, 2)  # hash/tag routers have no logits
    for loss in (losses.switch_aux, losses.z_loss):
        with pytest.raises(ValueError, match="this router does not provide"):
            loss(d)


def test_load_cv2_uses_smooth_probability_when_present() -> None:
    router = moekit.TopKRouter(8, 4, 2).train()
    d = router(torch.randn(16, 8))
    value = losses.load_cv2(d)
    torch.testing.assert_close(value, losses.cv_squared(d.load_prob_TE.sum(0)))
    value.backward()
    assert router.noise.weight.grad is not None


def test_importance_gradient_pushes_towards_balance() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0]] * 8, requires_grad=True)
    probs = torch.softmax(logits, -1)
    ids = torch.arange(3).expand(8, 3)
    losses.importance_cv2(RoutingDecision(ids, probs, 3, logits, probs)).backward()
    assert logits.grad[:, 0].mean() > 0 > logits.grad[:, 1].mean()  # descent lowers the favourite


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_aux_equals_transformers_mixtral_loss(top_k: int) -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    router = moekit.TopKRouter(12, 8, top_k, noisy=False)
    d = router(torch.randn(64, 12))
    hf = mixtral.load_balancing_loss_func((d.logits_TE,), num_experts=8, top_k=top_k)
    torch.testing.assert_close(losses.switch_aux(d), hf.float())
    switch = moekit.SwitchRouter(12, 8, capacity_factor=0.5)  # capacity drops do not change the loss
    ds = switch(torch.randn(64, 12))
    torch.testing.assert_close(losses.switch_aux(ds), mixtral.load_balancing_loss_func((ds.logits_TE,), 8, 1).float())


def _mixtral(hidden: int, inner: int, E: int, K: int, impl: str):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=E,
                                     num_experts_per_tok=K, experts_implementation=impl)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_glu_moe_equals_transformers_mixtral_block(impl: str) -> None:
    """Copied weights (fused ``gate_up_proj [E, 2F, D]`` layout): same outputs and same gradients."""
    block = _mixtral(16, 24, 4, 2, impl)
    router = moekit.TopKRouter(16, 4, 2, noisy=False)
    experts = moekit.GLUExperts(4, 16, 24)
    with torch.no_grad():
        router.gate.weight.copy_(block.gate.weight)
        experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        experts.down_proj.copy_(block.experts.down_proj)
    layer = moekit.MoE(router, experts)
    x = torch.randn(2, 5, 16)
    hf_y, y = block(x), layer(x).y
    torch.testing.assert_close(y, hf_y, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    hf_y.backward(g)
    y.backward(g)
    torch.testing.assert_close(experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(experts.down_proj.grad, block.experts.down_proj.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(router.gate.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-5)


def test_losses_are_registered() -> None:
    assert {"importance", "load", "switch", "z", "kl_uniform", "entropy"} <= set(moekit.list_losses())
    assert moekit.get_loss("switch") is losses.switch_aux
