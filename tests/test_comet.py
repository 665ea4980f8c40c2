"""COMET tree gate: heap paths, reference formula, <= k experts once saturated, exact conditional
computation (sparse dispatch == dense mix, outputs and gradients, log 0 handled), bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.routers.comet import COMETRouter, leaf_paths


def naive_gates(router: COMETRouter, x: torch.Tensor) -> torch.Tensor:
    """Recursive tree walk per token and tree, then the softmax over all k*n leaf scores."""
    n, k, g = router.num_experts, router.k, router.gamma
    split = router.split_logits(x).detach().double()
    leaf = torch.nn.functional.linear(x.double(), router.leaf.weight.double(), router.leaf.bias.double()).reshape(
        -1, k, n
    )
    S = lambda t: 0.0 if t <= -g / 2 else 1.0 if t >= g / 2 else -2 * t**3 / g**3 + 1.5 * t / g + 0.5
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)

    def walk(probs: torch.Tensor, split_KV: torch.Tensor, i: int, node: int, p: float) -> None:
        if node >= n - 1:
            probs[i, node - (n - 1)] = p
            return
        s = S(float(split_KV[i, node]))
        walk(probs, split_KV, i, 2 * node + 1, p * s)
        walk(probs, split_KV, i, 2 * node + 2, p * (1 - s))

    for b in range(x.shape[0]):
        probs = torch.zeros(k, n, dtype=torch.float64)
        for i in range(k):
            walk(probs, split[b], i, 0, 1.0)
        scores = torch.where(
            probs > 0,
            leaf[b].detach() + torch.log(probs.clamp_min(1e-300)),
            torch.tensor(-math.inf, dtype=torch.float64),
        )
        out[b] = torch.softmax(scores.flatten(), 0).reshape(k, n).sum(0)
    return out


def saturate(router: COMETRouter, factor: float = 1e4) -> None:
    with torch.no_grad():
        router.split.weight.mul_(factor)
        if router.split.bias is not None:
            router.split.bias.mul_(factor)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9])
def test_leaf_paths_follow_the_heap(n: int) -> None:
    paths = leaf_paths(n)
    assert paths.shape == (n, math.ceil(math.log2(n)) if n > 1 else 0)
    for j in range(n):
        node = 0
        for step in paths[j].tolist():
            if step == 2 * (n - 1):
                continue  # padding on the shallower level
            v, right = (step, False) if step < n - 1 else (step - (n - 1), True)
            assert v == node
            node = 2 * node + (2 if right else 1)
        assert node == n - 1 + j


@pytest.mark.parametrize("n,k,bias", [(8, 2, True), (6, 3, False), (5, 1, True), (1, 1, True), (3, 3, True)])
def test_gates_match_the_naive_tree_walk(n: int, k: int, bias: bool) -> None:
    router = COMETRouter(7, n, k, gamma=0.5, split_bias=bias)
    with torch.no_grad():
        router.split.weight.mul_(20)  # some splits saturated, some soft
        router.leaf.weight.normal_()
    x = torch.randn(6, 7)
    d = router(x)
    torch.testing.assert_close(d.gates_TE().double(), naive_gates(router, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.gates_TE().sum(-1), torch.ones(6))
    P = router.leaf_probabilities(router.split_logits(x))
    torch.testing.assert_close(P.sum(-1), torch.ones(6, k))


def test_published_initialisation_starts_soft() -> None:
    router = COMETRouter(10, 8, 2, gamma=1.0)
    assert router.split.weight.abs().max() <= 0.01 and router.leaf.weight.abs().max() <= 0.05
    assert (router.leaf.bias == 0).all()
    d = router(torch.randn(32, 10))
    assert d.k == 8 and not router.is_saturated(torch.randn(32, 10)).any()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 16),
    k_frac=st.floats(0, 1),
    tokens=st.integers(1, 30),
    gamma=st.floats(0.01, 10),
    seed=st.integers(0, 10_000),
)
def test_at_most_k_experts_once_saturated(n, k_frac, tokens, gamma, seed) -> None:
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (n - 1))
    router = COMETRouter(6, n, k, gamma=gamma)
    saturate(router)
    x = torch.randn(tokens, 6)
    sat = router.is_saturated(x)
    d = router(x)
    assert ((d.gates_TE() != 0).sum(-1)[sat] <= k).all()
    assert (d.kept_mask().sum(-1)[sat] <= k).all()
    torch.testing.assert_close(d.gates_TE().sum(-1), torch.ones(tokens))
    if sat.all():
        assert d.k == k


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_sparse_dispatch_equals_dense_mix_with_finite_gradients(scale: float) -> None:
    router = COMETRouter(8, 6, 2, gamma=1.0)
    saturate(router, scale)
    experts = moekit.MLPExperts(6, 8, 16)
    x = torch.randn(24, 8, requires_grad=True)
    params = [x, *router.parameters(), experts.up_proj, experts.down_proj]
    out_s = moekit.MoE(router, experts, combine="sparse")(x)
    out_d = moekit.MoE(router, experts, combine="dense")(x)
    torch.testing.assert_close(out_s.y, out_d.y, rtol=1e-5, atol=1e-6)
    grads_s = torch.autograd.grad(out_s.y.square().sum() + out_s.aux["entropy_reg"], params)
    grads_d = torch.autograd.grad(out_d.y.square().sum() + out_d.aux["entropy_reg"], params)
    for a, b in zip(grads_s, grads_d):
        assert torch.isfinite(a).all()  # log 0 = -inf never turns into NaN gradients
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_entropy_regulariser_saturates_the_trees() -> None:
    torch.manual_seed(0)
    router = COMETRouter(4, 8, 2, gamma=1.0)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    x = torch.randn(64, 4)
    for _ in range(120):
        loss = router(x).aux["entropy_reg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert router.is_saturated(x).float().mean() > 0.4 and router(x).k < 8


def test_registry() -> None:
    router = moekit.create_router("comet", dim=8, num_experts=5, k=2, gamma=0.1)
    assert isinstance(router, COMETRouter) and router.is_sparse and router.gamma == 0.1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"gamma": 0.0}, ValueError, "gamma must be a finite number > 0, got 0"),
        ({"gamma": -1.0}, ValueError, "gamma"),
        ({"k": 5}, ValueError, "k must be <= num_experts"),
        ({"k": 0}, ValueError, "k must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        COMETRouter(**{"dim": 4, "num_experts": 4, "k": 2, **kwargs})
