"""Router behaviour: hypothesis properties of top-k and capacity, the E=1 invariant, and each
standard router's defining rule (Switch scaling, expert choice, hash, tag, aux-free bias)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.routers.capacity import expert_capacity


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 9),
    k_frac=st.floats(0, 1),
    tokens=st.integers(1, 40),
    noisy=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_topk_weights_sum_to_one_over_at_most_k_distinct_experts(num_experts, k_frac, tokens, noisy, training, seed):
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (num_experts - 1))
    router = moekit.TopKRouter(8, num_experts, k, noisy=noisy).train(training)
    if noisy:
        with torch.no_grad():
            router.noise.weight.normal_()
    d = router(torch.randn(tokens, 8))
    assert d.ids_TK.shape == d.weights_TK.shape == (tokens, k)
    assert d.ids_TK.dtype == torch.long
    assert int(d.ids_TK.min()) >= 0 and int(d.ids_TK.max()) < num_experts
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(tokens))
    assert bool((d.weights_TK >= 0).all())
    assert all(len(set(row)) == k for row in d.ids_TK.tolist())  # k distinct experts per token
    assert bool(((d.gates_TE() > 0).sum(-1) <= k).all())
    # the chosen experts are the k largest logits (balancer-free router)
    top = d.logits_TE.topk(k, -1).values
    torch.testing.assert_close(d.logits_TE.gather(1, d.ids_TK).sort(-1).values, top.sort(-1).values)


@settings(max_examples=20, deadline=None)
@given(num_experts=st.integers(2, 8), tokens=st.integers(1, 30), seed=st.integers(0, 999))
def test_topk_without_renormalisation_uses_full_softmax(num_experts, tokens, seed) -> None:
    torch.manual_seed(seed)
    router = moekit.TopKRouter(8, num_experts, 1 + seed % num_experts, noisy=False, renormalize=False)
    d = router(torch.randn(tokens, 8))
    torch.testing.assert_close(d.weights_TK, d.probs_TE.gather(1, d.ids_TK))
    assert bool((d.weights_TK.sum(-1) <= 1 + 1e-6).all())


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 60),
    num_experts=st.integers(1, 8),
    k=st.integers(1, 3),
    cf=st.floats(0.05, 2.5),
    seed=st.integers(0, 999),
)
def test_capacity_never_exceeded_and_first_choices_win(tokens, num_experts, k, cf, seed) -> None:
    torch.manual_seed(seed)
    k = min(k, num_experts)
    d = moekit.TopKRouter(8, num_experts, k, noisy=False, capacity_factor=cf)(torch.randn(tokens, 8))
    cap = math.ceil(cf * tokens * k / num_experts)
    assert expert_capacity(tokens, k, num_experts, cf) == max(1, cap)
    assert bool((d.counts() <= max(1, cap)).all())
    kept = d.kept_mask()
    for e in range(num_experts):
        wanted = int((d.ids_TK == e).sum())
        served = int(((d.ids_TK == e) & kept).sum())
        assert served == min(wanted, max(1, cap))  # drops only when over capacity
        for rank in range(1, k):  # a later choice is served only if no earlier choice was dropped
            if bool(((d.ids_TK[:, rank] == e) & kept[:, rank]).any()):
                assert bool(kept[:, :rank][d.ids_TK[:, :rank] == e].all())
    # within one choice rank, earlier tokens are served first
    for e in range(num_experts):
        rows = kept[:, 0][d.ids_TK[:, 0] == e].tolist()
        assert rows == sorted(rows, reverse=True)


def test_dropless_keeps_every_slot() -> None:
    d = moekit.TopKRouter(8, 4, 2, capacity_factor=None)(torch.randn(50, 8))
    assert d.kept_TK is None and d.counts().sum() == 100


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 999), bias=st.booleans(), activation=st.sampled_from(["gelu", "relu", "silu"]))
def test_single_expert_top1_equals_dense_mlp(seed, bias, activation) -> None:
    torch.manual_seed(seed)
    experts = moekit.MLPExperts(1, 8, 16, bias=bias, activation=activation)
    layer = moekit.MoE(moekit.TopKRouter(8, 1, 1), experts)
    act = {"gelu": torch.nn.GELU(), "relu": torch.nn.ReLU(), "silu": torch.nn.SiLU()}[activation]
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=bias), act, torch.nn.Linear(16, 8, bias=bias))
    with torch.no_grad():
        mlp[0].weight.copy_(experts.up_proj[0])
        mlp[2].weight.copy_(experts.down_proj[0])
        if bias:
            mlp[0].bias.copy_(experts.up_bias[0])
            mlp[2].bias.copy_(experts.down_bias[0])
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(layer(x).y, mlp(x), rtol=1e-5, atol=1e-6)


def test_single_expert_top1_glu_equals_dense_swiglu() -> None:
    experts = moekit.GLUExperts(1, 8, 16)
    layer = moekit.MoE(moekit.TopKRouter(8, 1, 1), experts)
    x = torch.randn(5, 8)
    gate, up = (x @ experts.gate_up_proj[0].t()).chunk(2, -1)
    torch.testing.assert_close(layer(x).y, (torch.nn.functional.silu(gate) * up) @ experts.down_proj[0].t())


def test_eval_is_deterministic_and_noise_only_in_training() -> None:
    router = moekit.TopKRouter(8, 6, 2)
    with torch.no_grad():
        router.noise.weight.normal_(std=3.0)
    x = torch.randn(40, 8)
    router.eval()
    assert torch.equal(router(x).ids_TK, router(x).ids_TK)
    assert router(x).load_prob_TE is None
    router.train()
    assert not torch.equal(router(x).logits_TE, router(x).logits_TE)


def test_switch_scales_by_probability() -> None:
    d = moekit.SwitchRouter(8, 4, capacity_factor=None)(torch.randn(10, 8))
    assert d.k == 1
    torch.testing.assert_close(d.weights_TK[:, 0], d.probs_TE.max(-1).values)


def test_expert_choice_each_expert_takes_its_top_c_tokens() -> None:
    router = moekit.ExpertChoiceRouter(8, 4, capacity_factor=1.0)
    d = router(torch.randn(16, 8))
    assert d.counts().tolist() == [4.0, 4.0, 4.0, 4.0]
    for e in range(4):
        chosen = set(torch.nonzero(d.kept_TK[:, e]).flatten().tolist())
        assert chosen == set(d.probs_TE[:, e].topk(4).indices.tolist())
    torch.testing.assert_close(d.weights_TK, d.probs_TE)
    assert moekit.ExpertChoiceRouter(8, 4, capacity_factor=100.0)(torch.randn(5, 8)).counts().tolist() == [5.0] * 4


def test_hash_random_table_is_fixed_and_balanced_mode_balances() -> None:
    router = moekit.HashRouter(4, 3, num_keys=10, k=2, seed=3)
    keys = {"token_ids": torch.tensor([1, 1, 7])}
    d = router(torch.randn(3, 4), meta=keys)
    assert torch.equal(d.ids_TK[0], d.ids_TK[1]) and bool((d.ids_TK[:, 0] != d.ids_TK[:, 1]).all())
    torch.testing.assert_close(d.weights_TK, torch.full((3, 2), 0.5))
    assert torch.equal(moekit.HashRouter(4, 3, num_keys=10, k=2, seed=3)(torch.randn(3, 4), meta=keys).ids_TK, d.ids_TK)
    counts = [100, 90, 10, 10, 5, 5, 1, 1]
    balanced = moekit.HashRouter(4, 2, num_keys=8, mode="balanced", key_counts=counts)
    load = [0, 0]
    for key, c in enumerate(counts):
        load[int(balanced.table[key, 0])] += c
    assert abs(load[0] - load[1]) <= 10


def test_tag_router_uses_mapping_and_per_example_tags_broadcast() -> None:
    d = moekit.TagRouter(4, 3, mapping={7: 2, 1: 0})(torch.randn(3, 4), meta={"tag": torch.tensor([7, 1, 7])})
    assert d.ids_TK[:, 0].tolist() == [2, 0, 2]
    layer = moekit.MoE(moekit.TagRouter(4, 3), moekit.MLPExperts(3, 4, 8))
    out = layer(torch.randn(2, 5, 4), meta={"tag": torch.tensor([2, 1])})
    assert out.decision.ids_TK[:, 0].tolist() == [2] * 5 + [1] * 5


def test_aux_free_bias_balances_selection_only() -> None:
    balancer = moekit.AuxFreeBias(4, rate=0.05)
    router = moekit.TopKRouter(8, 4, 1, noisy=False, balancer=balancer).train()
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.gate.weight[0] += 1.0  # expert 0 wins almost every token at first
    x = torch.randn(512, 8).abs()
    before = router(x).counts()
    for _ in range(200):
        router(x)
    d = router(x)
    assert d.counts().std() < 0.5 * before.std()
    assert balancer.bias[0] < 0
    # weights still come from the unbiased logits
    torch.testing.assert_close(d.weights_TK, torch.ones(512, 1))
    torch.testing.assert_close(d.probs_TE, torch.softmax(router.gate(x), -1))
    # eval does not update the state; the state is saved with the model
    bias = balancer.bias.clone()
    router.eval()(x)
    assert torch.equal(balancer.bias, bias) and "balancer.bias" in router.state_dict()


def test_smooth_load_probability_is_differentiable_probability() -> None:
    router = moekit.TopKRouter(8, 5, 2).train()
    with torch.no_grad():
        router.noise.weight.normal_()
    d = router(torch.randn(64, 8))
    p = d.load_prob_TE
    assert p is not None and bool(((p >= 0) & (p <= 1)).all())
    assert math.isclose(float(p.detach().sum(-1).mean()), 2.0, rel_tol=0.35)  # about k experts per token
    moekit.get_loss("load")(d).backward()
    assert router.noise.weight.grad is not None and router.gate.weight.grad is not None


@pytest.mark.parametrize("cf", [0.25, 1.0])
def test_switch_capacity_drops_tokens_and_zero_output_for_them(cf: float) -> None:
    layer = moekit.MoE(moekit.SwitchRouter(8, 4, capacity_factor=cf), moekit.MLPExperts(4, 8, 16))
    x = torch.randn(40, 8)
    out = layer(x)
    dropped = ~out.decision.kept_mask()[:, 0]
    assert bool((out.decision.counts() <= math.ceil(cf * 40 / 4)).all())
    if cf < 1:
        assert bool(dropped.any())
    assert bool((out.y[dropped] == 0).all()) and bool((out.y[~dropped] != 0).any(-1).all())
