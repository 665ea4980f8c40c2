"""Permutation local search: Sinkhorn / Hungarian, valid permutations, identity leaves the wrapped
router unchanged, a hard permutation equals permuting the experts, schedule and resume, bad input."""

import itertools

import pytest
import torch

import moekit
from moekit.checkpoint import load_checkpoint, save_checkpoint
from moekit.models.multitask import MultiGateMoE
from moekit.routers.local_search import PermutationLocalSearch, hungarian, sinkhorn

DIM, E = 8, 6


def inner(name: str) -> moekit.Router:
    if name == "topk":
        return moekit.TopKRouter(DIM, E, 2, noisy=False)
    if name == "hash":
        return moekit.HashRouter(DIM, E, num_keys=50, k=2)
    return moekit.create_router(name, dim=DIM, num_experts=E, k=2, gamma=0.5)


META = {"token_ids": torch.arange(20) % 50}


def test_sinkhorn_is_doubly_stochastic_and_hungarian_is_optimal() -> None:
    pi = sinkhorn(torch.randn(5, 5), 200)
    torch.testing.assert_close(pi.sum(0), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(pi.sum(1), torch.ones(5), atol=1e-4, rtol=0)
    scores = torch.rand(5, 5)
    perm = hungarian(scores)
    assert sorted(perm.tolist()) == list(range(5))
    best = max(itertools.permutations(range(5)), key=lambda p: sum(float(scores[i, p[i]]) for i in range(5)))
    assert perm.tolist() == list(best)


@pytest.mark.parametrize("name", ["topk", "hash", "dselect", "comet"])
def test_learning_ends_in_a_valid_frozen_permutation(name: str) -> None:
    router = PermutationLocalSearch(inner(name), learn_steps=4).train()
    experts = moekit.MLPExperts(E, DIM, 16)
    opt = torch.optim.Adam(list(router.parameters()) + list(experts.parameters()), lr=0.05)
    x = torch.randn(20, DIM)
    for step in range(6):
        out = moekit.MoE(router, experts)(x, meta=META)
        loss = out.y.square().mean() + 1e-4 * out.aux["perm_entropy"]
        opt.zero_grad()
        loss.backward()
        if step < 3:
            assert router.log_weights.grad is not None and torch.isfinite(router.log_weights.grad).all()
        opt.step()
    assert bool(router.frozen) and int(router.step) == 4
    assert sorted(router.perm.tolist()) == list(range(E))
    assert out.aux["perm_entropy"] == 0
    d_inner, d = router.router(x, meta=META), router(x, meta=META)
    assert torch.equal(d.ids_TK, router.perm[d_inner.ids_TK]) and torch.equal(d.weights_TK, d_inner.weights_TK)


@pytest.mark.parametrize("name", ["topk", "hash", "dselect", "comet"])
def test_identity_permutation_leaves_the_router_unchanged(name: str) -> None:
    router = PermutationLocalSearch(inner(name), learn_steps=10)
    x = torch.randn(20, DIM)
    with torch.no_grad():  # soft phase with Pi = identity (exp underflows off the diagonal)
        router.log_weights.copy_(torch.eye(E))
    d_inner, d_soft = router.router(x, meta=META), router(x, meta=META)
    torch.testing.assert_close(d_soft.gates_TE(), d_inner.gates_TE().float())
    assert d_soft.k == d_inner.k
    with torch.no_grad():  # frozen at the identity
        router.frozen.fill_(True)
    d_hard = router(x, meta=META)
    assert torch.equal(d_hard.ids_TK, d_inner.ids_TK) and torch.equal(d_hard.weights_TK, d_inner.weights_TK)
    if d_inner.probs_TE is not None:
        assert torch.equal(d_hard.probs_TE, d_inner.probs_TE)


def test_hard_permutation_equals_permuting_the_experts() -> None:
    router = PermutationLocalSearch(moekit.TopKRouter(DIM, E, 2, noisy=False), learn_steps=1)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    with torch.no_grad():
        router.perm.copy_(perm)
        router.frozen.fill_(True)
    experts = moekit.MLPExperts(E, DIM, 16)
    moved = moekit.MLPExperts(E, DIM, 16)
    with torch.no_grad():  # slot s of the plain router must reach the expert that perm sends it to
        for name, p in moved.named_parameters():
            p.copy_(getattr(experts, name)[perm])
    x = torch.randn(15, DIM)
    torch.testing.assert_close(moekit.MoE(router, experts)(x).y, moekit.MoE(router.router, moved)(x).y)


def test_schedule_anneals_and_eval_does_not_advance_it() -> None:
    router = PermutationLocalSearch(
        inner("topk"), learn_steps=10, tau_start=1e-1, tau_end=1e-3, iters_start=5, iters_end=25
    )
    assert router.temperature() == pytest.approx(1e-1) and router.iterations() == 5
    x = torch.randn(4, DIM)
    router.eval()
    router(x)
    assert int(router.step) == 0
    router.train()
    for _ in range(5):
        router(x)
    assert router.temperature() == pytest.approx(1e-2) and router.iterations() == 15
    assert not bool(router.frozen)


def _mmoe(learn_steps: int) -> MultiGateMoE:
    kwargs = {"k": 2, "base": "comet", "base_kwargs": {"gamma": 0.5}, "learn_steps": learn_steps}
    tasks = [{"name": "a", "num_outputs": 3}, {"name": "b", "kind": "regression", "num_outputs": 1}]
    return MultiGateMoE(DIM, tasks, num_experts=E, router="local_search", router_kwargs=kwargs)


@pytest.mark.parametrize("steps_before_save", [3, 7])
def test_resume_restores_the_schedule(tmp_path, steps_before_save: int) -> None:
    torch.manual_seed(0)
    model = _mmoe(learn_steps=5)
    x, ys = torch.randn(16, DIM), [torch.randint(0, 3, (16,)), torch.randn(16)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(m: MultiGateMoE, o: torch.optim.Optimizer) -> None:
        out = m(x)
        loss = sum(m.task_losses(out, ys)) + sum(1e-4 * g.aux["perm_entropy"] for g in out.moe)
        o.zero_grad()
        loss.backward()
        o.step()

    for _ in range(steps_before_save):
        step(model, opt)
    save_checkpoint(model, tmp_path / "ckpt")
    resumed = load_checkpoint(tmp_path / "ckpt")
    for a, b in zip(model.gates, resumed.gates):
        assert int(a.step) == int(b.step) == min(steps_before_save, 5)  # the count stops once frozen
        assert bool(a.frozen) == bool(b.frozen) == (steps_before_save >= 5)
        assert torch.equal(a.perm, b.perm) and a.temperature() == b.temperature()
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1)
    for _ in range(3):  # both continue identically, through the freezing step
        step(model, opt)
        step(resumed, opt2)
    model.eval(), resumed.eval()
    for a, b in zip(model(x).outputs, resumed(x).outputs):
        torch.testing.assert_close(a, b)
    assert all(bool(g.frozen) for g in resumed.gates)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="sparse router.*SoftmaxRouter"):
        PermutationLocalSearch(moekit.SoftmaxRouter(DIM, E), learn_steps=5)
    with pytest.raises(TypeError, match="moekit Router"):
        PermutationLocalSearch(torch.nn.Linear(DIM, E), learn_steps=5)
    with pytest.raises(ValueError, match="learn_steps must be >= 1, got 0"):
        PermutationLocalSearch(inner("topk"), learn_steps=0)
    with pytest.raises(ValueError, match="tau_start must be a finite number > 0"):
        PermutationLocalSearch(inner("topk"), learn_steps=3, tau_start=0.0)
    with pytest.raises(ValueError, match="sparse router"):
        moekit.create_router("local_search", dim=DIM, num_experts=E, base="softmax")
