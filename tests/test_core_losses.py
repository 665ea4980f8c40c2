"""Balancing losses: hand-computed values, and equality with Hugging Face transformers."""

import math

import pytest
import torch

import moekit
from moekit import losses
from moekit.types import RoutingDecision


def _decision(ids, weights, E, logits=None):
    logits = None if logits is None else torch.as_tensor(logits, dtype=torch.float32)
    probs = None if logits is None else torch.softmax(logits, -1)
    return RoutingDecision(torch.as_tensor(ids), torch.as_tensor(weights, dtype=torch.float32), E, logits, probs)


def test_importance_cv2_by_hand() -> None:
    d = _decision([[0], [0], [1]], [[0.5], [1.0], [1.0]], 3)  # importance = [1.5, 1, 0]
    imp = torch.tensor([1.5, 1.0, 0.0])
    expected = float(imp.var(correction=0) / imp.mean() ** 2)
    assert math.isclose(float(losses.importance_cv2(d)), expected, rel_tol=1e-6)


def test_kl_to_uniform_by_hand() -> None:
    d = _decision([[0], [1], [1], [1]], [[1.0]] * 4, 2)  # p = [0.25, 0.75]
    expected = 0.25 * math.log(0.25 * 2) + 0.75 * math.log(0.75 * 2)
    assert math.isclose(float(losses.kl_to_uniform(d)), expected, rel_tol=1e-6)
    assert math.isclose(float(losses.kl_to_uniform(_decision([[0], [1]], [[1.0]] * 2, 2))), 0.0, abs_tol=1e-7)


def test_z_and_entropy_by_hand() -> None:
    logits = [[0.0, 0.0], [1.0, 2.0]]
    d = _decision([[0], [1]], [[1.0], [1.0]], 2, logits)
    lse = torch.logsumexp(torch.tensor(logits), -1)
    assert math.isclose(float(losses.z_loss(d)), float(lse.pow(2).mean()), rel_tol=1e-6)
    p = torch.softmax(torch.tensor(logits), -1)
    assert math.isclose(float(losses.entropy(d)), float(-(p * p.log()).sum(-1).mean()), rel_tol=1e-6)


def test_load_cv2_uses_smooth_probability_when_present() -> None:
    router = moekit.TopKRouter(8, 4, 2).train()
    d = router(torch.randn(16, 8))
    value = losses.load_cv2(d)
    assert value.requires_grad
    value.backward()
    assert router.noise.weight.grad is not None


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_aux_equals_transformers(top_k: int) -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(64, 8)
    hf = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(top_k, -1).indices
    d = RoutingDecision(ids, probs.gather(1, ids), 8, logits, probs)
    torch.testing.assert_close(losses.switch_aux(d), hf.float())


def test_glu_moe_equals_transformers_mixtral_block() -> None:
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    router = moekit.TopKRouter(16, 4, 2, noisy=False).eval()
    experts = moekit.GLUExperts(4, 16, 24)
    with torch.no_grad():
        router.gate.weight.copy_(block.gate.weight)
        experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        experts.down_proj.copy_(block.experts.down_proj)
    x = torch.randn(2, 5, 16)
    hf_out = block(x)
    hf_y = hf_out[0] if isinstance(hf_out, tuple) else hf_out
    torch.testing.assert_close(moekit.MoE(router, experts)(x).y, hf_y, rtol=1e-4, atol=1e-5)


def test_losses_are_registered() -> None:
    assert {"importance", "load", "switch", "z", "kl_uniform", "entropy"} <= set(moekit.list_losses())
    assert moekit.get_loss("switch") is losses.switch_aux
