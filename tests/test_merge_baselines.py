"""The SMEAR comparison's extra baselines: AdaMix and Latent Skills routers (merged experts), and top-k
with expert dropout (the official SMEAR code's top-k baseline)."""

import pytest
import torch

import moekit
from moekit.layers import build_routed_block
from moekit.routers import AdamixRouter, LatentSkillsRouter, TopKRouter


def test_adamix_picks_one_random_expert_in_training_and_averages_in_eval() -> None:
    router = AdamixRouter(8, 4)
    w = router(torch.randn(4000, 8)).weights_TK
    assert torch.equal(w.sum(-1), torch.ones(4000)) and set(w.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(w.mean(0), torch.full((4,), 0.25), atol=0.03)
    router.eval()
    assert torch.equal(router(torch.randn(3, 8)).weights_TK, torch.full((3, 4), 0.25))


def test_adamix_block_at_inference_is_the_averaged_expert() -> None:
    block = build_routed_block("adamix", dim=12, num_experts=3, width=4).eval()
    x = torch.randn(2, 5, 12)
    bank = block.experts
    averaged = {name: p.mean(0, keepdim=True) for name, p in bank.named_parameters()}
    single = moekit.AdapterExperts(1, 12, 4)
    single.load_state_dict(averaged)
    torch.testing.assert_close(block(x).y, single.restore(single.expert_forward(single.as_tokens(x), 0), x))


def test_latent_skills_routes_by_tag_and_learns_its_logits() -> None:
    router = LatentSkillsRouter(8, 3, num_tags=2)
    with torch.no_grad():
        router.skill_logits.copy_(torch.tensor([[2.0, 0.0, -2.0], [0.0, 0.0, 0.0]]))
    router.eval()
    d = router(torch.randn(2, 8), meta={"tag": torch.tensor([0, 1])})
    expected = torch.sigmoid(router.skill_logits.detach())
    torch.testing.assert_close(d.weights_TK, expected / expected.sum(-1, keepdim=True))
    router.train()
    d = router(torch.randn(5, 8), meta={"tag": torch.tensor([0, 1, 0, 1, 1])})
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(5))
    d.weights_TK[:, 0].sum().backward()
    assert router.skill_logits.grad is not None and router.skill_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"meta\['tag'\] must lie in \[0, num_tags=2\)"):
        router(torch.randn(1, 8), meta={"tag": torch.tensor([2])})


def test_topk_expert_dropout_hides_experts_in_training_only() -> None:
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 1, noisy=False, renormalize=False, expert_dropout=0.5)
    x = torch.randn(2000, 8)
    d = router(x)
    unavailable = d.probs_TE == 0
    assert 0.4 < unavailable.float().mean() < 0.5  # ~half dropped, but every token keeps at least k = 1
    assert not unavailable.gather(1, d.ids_TK).any()  # a dropped expert is never chosen
    torch.testing.assert_close(d.probs_TE.sum(-1), torch.ones(2000))  # renormalised over the available ones
    torch.testing.assert_close(d.weights_TK, d.probs_TE.gather(1, d.ids_TK))
    assert torch.isfinite(d.logits_TE).all()  # the decision keeps the raw logits
    router.eval()
    plain = TopKRouter(8, 6, 1, noisy=False, renormalize=False).eval()
    plain.load_state_dict(router.state_dict())
    assert torch.equal(router(x).ids_TK, plain(x).ids_TK)
    with pytest.raises(ValueError, match=r"expert_dropout must be in \[0, 1\)"):
        TopKRouter(8, 6, 1, expert_dropout=1.0)
