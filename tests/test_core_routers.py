"""Routers: a sweep over every registered router, properties (hypothesis), capacity, balancing."""

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.registry import ROUTERS
from moekit.routers.capacity import expert_capacity

DIM, E, T = 16, 6, 20

# Extra constructor arguments and metadata for routers that need them; every other router is built
# from (dim, num_experts[, k]). A router that cannot be built this way fails the sweep loudly.
EXTRA_KWARGS = {"hash": {"num_keys": 50}, "tag": {}}
META = {"hash": {"token_ids": torch.arange(T) % 50}, "tag": {"tag": torch.arange(T) % E}}


def build(name: str, **overrides):
    factory = ROUTERS.get(name)
    params = inspect.signature(factory).parameters
    kwargs = {"dim": DIM, "num_experts": E, **EXTRA_KWARGS.get(name, {})}
    if "k" in params:
        kwargs["k"] = 2
    kwargs.update(overrides)
    return factory(**kwargs)


@pytest.mark.parametrize("name", moekit.list_routers())
@pytest.mark.parametrize("training", [True, False])
def test_every_router_routes_and_backprops(name: str, training: bool) -> None:
    router = build(name).train(training)
    x = torch.randn(T, DIM, requires_grad=True)
    d = router(x, meta=META.get(name))
    assert d.ids_TK.shape == d.weights_TK.shape and d.ids_TK.shape[0] == T
    assert d.ids_TK.dtype == torch.long
    assert int(d.ids_TK.min()) >= 0 and int(d.ids_TK.max()) < E
    assert torch.isfinite(d.weights_TK).all()
    for value in d.aux.values():
        assert torch.isfinite(value).all()
    layer = moekit.MoE(router, moekit.MLPExperts(E, DIM, 8))
    out = layer(x, meta=META.get(name))
    loss = out.y.square().mean() + sum(out.aux.values(), torch.zeros(()))
    if "log_prob" in out.decision.extras:  # score-function estimators train from their own terms
        terms = moekit.reinforce_terms(out.decision, out.y.square().mean(-1))
        loss = loss + terms["policy"] + terms["value"]
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if list(router.parameters()) and training:  # hard top-1 routers have no gradient in eval
        assert any(p.grad is not None for p in router.parameters())


@settings(max_examples=30, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    k_frac=st.floats(0, 1),
    tokens=st.integers(1, 40),
    noisy=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_topk_weights_sum_to_one_and_at_most_k(num_experts, k_frac, tokens, noisy, seed) -> None:
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (num_experts - 1))
    router = moekit.TopKRouter(8, num_experts, k, noisy=noisy).train()
    d = router(torch.randn(tokens, 8))
    assert d.ids_TK.shape == (tokens, k)
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(tokens))
    assert all(len(set(row)) == k for row in d.ids_TK.tolist())  # k distinct experts per token
    assert ((d.gates_TE() > 0).sum(-1) <= k).all()


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 50), num_experts=st.integers(1, 6), cf=st.floats(0.1, 2.0), seed=st.integers(0, 999))
def test_capacity_never_exceeded(tokens, num_experts, cf, seed) -> None:
    torch.manual_seed(seed)
    k = min(2, num_experts)
    d = moekit.TopKRouter(8, num_experts, k, capacity_factor=cf)(torch.randn(tokens, 8))
    cap = expert_capacity(tokens, k, num_experts, cf)
    assert (d.counts() <= cap).all()
    # first choices are served before any second choice
    if d.kept_TK is not None and k == 2:
        served_second = d.kept_TK[:, 1]
        for e in range(num_experts):
            first_dropped = (~d.kept_TK[:, 0] & (d.ids_TK[:, 0] == e)).any()
            assert not (first_dropped and (served_second & (d.ids_TK[:, 1] == e)).any())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 999), bias=st.booleans())
def test_single_expert_top1_equals_dense_mlp(seed, bias) -> None:
    torch.manual_seed(seed)
    experts = moekit.MLPExperts(1, 8, 16, bias=bias)
    layer = moekit.MoE(moekit.TopKRouter(8, 1, 1), experts)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=bias), torch.nn.GELU(), torch.nn.Linear(16, 8, bias=bias))
    with torch.no_grad():
        mlp[0].weight.copy_(experts.up_proj[0])
        mlp[2].weight.copy_(experts.down_proj[0])
        if bias:
            mlp[0].bias.copy_(experts.up_bias[0])
            mlp[2].bias.copy_(experts.down_bias[0])
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(layer(x).y, mlp(x), rtol=1e-5, atol=1e-6)


def test_switch_scales_by_probability() -> None:
    router = moekit.SwitchRouter(8, 4, capacity_factor=None)
    d = router(torch.randn(10, 8))
    torch.testing.assert_close(d.weights_TK[:, 0], d.probs_TE.max(-1).values)


def test_expert_choice_balance_is_exact() -> None:
    router = moekit.ExpertChoiceRouter(8, 4, capacity_factor=1.0)
    d = router(torch.randn(16, 8))
    assert d.counts().tolist() == [4.0, 4.0, 4.0, 4.0]


def test_hash_balanced_assignment_balances_frequent_keys() -> None:
    counts = [100, 90, 10, 10, 5, 5, 1, 1]
    router = moekit.HashRouter(4, 2, num_keys=8, mode="balanced", key_counts=counts)
    load = [0, 0]
    for key, c in enumerate(counts):
        load[int(router.table[key, 0])] += c
    assert abs(load[0] - load[1]) <= 10


def test_tag_router_uses_mapping() -> None:
    router = moekit.TagRouter(4, 3, mapping={7: 2, 1: 0})
    d = router(torch.randn(3, 4), meta={"tag": torch.tensor([7, 1, 7])})
    assert d.ids_TK[:, 0].tolist() == [2, 0, 2]


def test_per_example_meta_is_broadcast_to_tokens() -> None:
    layer = moekit.MoE(moekit.TagRouter(4, 3), moekit.MLPExperts(3, 4, 8))
    out = layer(torch.randn(2, 5, 4), meta={"tag": torch.tensor([2, 1])})
    assert out.decision.ids_TK[:, 0].tolist() == [2] * 5 + [1] * 5


def test_aux_free_bias_moves_load_towards_balance() -> None:
    torch.manual_seed(0)
    balancer = moekit.AuxFreeBias(4, rate=0.05)
    router = moekit.TopKRouter(8, 4, 1, noisy=False, balancer=balancer).train()
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.gate.weight[0] += 1.0  # expert 0 wins almost every token at first
    x = torch.randn(512, 8).abs()
    before = router(x).counts()
    for _ in range(200):
        router(x)
    after = router(x).counts()
    assert after.std() < 0.5 * before.std()
    assert balancer.bias[0] < 0
    state = router.state_dict()
    assert "balancer.bias" in state


def test_smooth_load_probability_is_a_probability() -> None:
    router = moekit.TopKRouter(8, 5, 2).train()
    with torch.no_grad():
        router.noise.weight.normal_()
    d = router(torch.randn(30, 8))
    p = d.load_prob_TE
    assert p is not None and ((p >= 0) & (p <= 1)).all()
    assert math.isclose(float(p.detach().sum(-1).mean()), 2.0, rel_tol=0.5)
