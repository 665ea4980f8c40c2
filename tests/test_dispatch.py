"""Sparse dispatch against the per-expert loop, for every bank: outputs and gradients (inputs, expert
parameters, routing weights and the router's own parameters), on every grouped-matmul path (fused,
loop, and the CPU split of the groups over threads)."""

from typing import Callable

import pytest
import torch

import moekit
from moekit.experts import combine_dense, cpu_grouped, dispatch, dispatch_reference
from moekit.experts import grouped as grouped_module
from moekit.experts.dispatch import DispatchPlan, scatter_weighted, plan_dispatch
from moekit.types import RoutingDecision

T, D = 9, 8


def grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    got = torch.autograd.grad(out, inputs, g, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, got)]


def make_bank(name: str, E: int) -> moekit.ExpertBank:
    return {
        "mlp": lambda: moekit.MLPExperts(E, D, 12),
        "mlp_nobias": lambda: moekit.MLPExperts(E, D, 12, bias=False, activation="relu"),
        "glu": lambda: moekit.GLUExperts(E, D, 12),
        "glu_gelu": lambda: moekit.GLUExperts(E, D, 12, activation="gelu"),
        "adapter": lambda: moekit.AdapterExperts(E, D, 4),
        "conv": lambda: moekit.ConvExperts(E, D, 4, 3),
    }[name]()


def make_input(bank: str, tokens: int = T) -> torch.Tensor:
    shape = (tokens, D, 5, 5) if bank == "conv" else (tokens, D)
    return torch.randn(*shape, requires_grad=True)


def distinct_ids(E: int, K: int) -> torch.Tensor:
    """K distinct experts per token, expert E-1 never chosen when K < E - 1 (an empty expert)."""
    pool = max(E - 1, K)
    return torch.stack([torch.randperm(pool)[:K] for _ in range(T)])


# name -> (E, K, ids, kept mask or None)
CASES: dict[str, Callable[[], tuple[int, int, torch.Tensor, torch.Tensor | None]]] = {
    "top2_empty_expert": lambda: (5, 2, distinct_ids(5, 2), None),
    "single_expert": lambda: (1, 1, torch.zeros(T, 1, dtype=torch.long), None),
    "k_equals_E": lambda: (3, 3, torch.stack([torch.randperm(3) for _ in range(T)]), None),
    "dropped_slots": lambda: (4, 2, distinct_ids(4, 2), torch.rand(T, 2) > 0.4),
    "all_dropped": lambda: (4, 2, distinct_ids(4, 2), torch.zeros(T, 2, dtype=torch.bool)),
}


@pytest.fixture(params=["fast", "loop", "split"])
def path(request, monkeypatch) -> str:
    """Run each test on the fused grouped-matmul kernel, on the loop fallback, and on the CPU path
    that splits the groups over 2 threads (forced here for any product size)."""
    if request.param == "loop":
        monkeypatch.setattr(grouped_module, "grouped_mm_available", lambda x, w: False)
    if request.param == "split":
        monkeypatch.setattr(cpu_grouped, "_intra_op_threads", lambda: 2)
        monkeypatch.setattr(cpu_grouped, "MIN_SPLIT_MACS", 0)
    return request.param


@pytest.mark.parametrize("bank", ["mlp", "mlp_nobias", "glu", "glu_gelu", "adapter", "conv"])
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_matches_loop(bank: str, case: str, path: str) -> None:
    E, K, ids, kept = CASES[case]()
    experts = make_bank(bank, E)
    x = make_input(bank)
    weights = torch.softmax(torch.randn(T, K), -1).requires_grad_()
    decision = RoutingDecision(ids, weights, E, kept_TK=kept)
    y, ref = dispatch(experts, x, decision), dispatch_reference(experts, x, decision)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    inputs = [x, weights, *experts.parameters()]
    names = ["x", "weights", *(n for n, _ in experts.named_parameters())]
    g = torch.randn_like(ref)
    for name, a, r in zip(names, grads(y, inputs, g), grads(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


ROUTED = {
    "topk_capacity": lambda: moekit.TopKRouter(D, 4, 2, noisy=False, capacity_factor=0.5),
    "noisy_topk_train": lambda: moekit.TopKRouter(D, 4, 2).train(),
    "switch_capacity": lambda: moekit.SwitchRouter(D, 4, capacity_factor=0.6),
    "expert_choice": lambda: moekit.ExpertChoiceRouter(D, 4, capacity_factor=1.0),
    "softmax_dense": lambda: moekit.SoftmaxRouter(D, 4),
}


@pytest.mark.parametrize("router_name", list(ROUTED))
@pytest.mark.parametrize("bank", ["glu", "mlp"])
def test_router_gradients_match_loop(router_name: str, bank: str, path: str) -> None:
    """The same decision through both combines gives the same grads for the router's own weights."""
    router = ROUTED[router_name]()
    experts = make_bank(bank, 4)
    x = make_input(bank)
    if router_name in ("topk_capacity", "switch_capacity"):
        assert router(x).kept_TK is not None and not bool(router(x).kept_TK.all())  # some slots dropped
    torch.manual_seed(1)
    decision = router(x)
    y, ref = dispatch(experts, x, decision), dispatch_reference(experts, x, decision)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    inputs = [x, *router.parameters(), *experts.parameters()]
    g = torch.randn_like(ref)
    for a, r in zip(grads(y, inputs, g), grads(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_weighted_scatter_gradcheck() -> None:
    """The hand-written backward of the weighted scatter, in float64 against finite differences."""
    token = torch.tensor([0, 2, 2, 1, 0, 4])
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def scatter(y_N: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        return scatter_weighted(y_N, DispatchPlan(token, w_N, torch.tensor([6])), 5)

    assert torch.autograd.gradcheck(scatter, (y, w))
    out = scatter(y, w)
    assert out[3].abs().sum() == 0  # token 3 has no row
    torch.testing.assert_close(out[2], w[1] * y[1] + w[2] * y[2])


def test_plan_sorts_stably_and_skips_dropped() -> None:
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    kept = torch.tensor([[True, True], [True, False], [True, True]])
    plan = plan_dispatch(RoutingDecision(ids, torch.rand(3, 2), 4, kept_TK=kept))
    assert plan.sizes_E.tolist() == [2, 1, 2, 0]
    assert plan.token_N.tolist() == [0, 1, 2, 0, 2]


def test_empty_batch() -> None:
    layer = moekit.MoE(moekit.TopKRouter(D, 4, 2), moekit.GLUExperts(4, D, 16))
    x = torch.randn(0, D, requires_grad=True)
    out = layer(x)
    assert out.y.shape == (0, D)
    out.y.sum().backward()


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice", "softmax"])
def test_moe_layer_sparse_equals_dense_combine(router: str) -> None:
    kwargs = {"topk": {"k": 2}, "switch": {"capacity_factor": None}}.get(router, {})
    r = moekit.create_router(router, dim=D, num_experts=4, **kwargs).eval()
    experts = moekit.GLUExperts(4, D, 16)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(moekit.MoE(r, experts)(x).y, moekit.MoE(r, experts, combine="dense")(x).y,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bank", ["mlp", "glu", "adapter", "conv"])
def test_forward_dense_matches_each_expert(bank: str) -> None:
    experts = make_bank(bank, 3)
    x = make_input(bank, 4).detach()
    dense = experts.forward_dense(x)
    for e in range(3):
        torch.testing.assert_close(dense[:, e], experts.expert_forward(x, e), rtol=1e-5, atol=1e-6)
    gates = torch.softmax(torch.randn(4, 3), -1)
    ids = torch.arange(3).expand(4, 3)
    torch.testing.assert_close(combine_dense(experts, x, gates), dispatch(experts, x, RoutingDecision(ids, gates, 3)),
                               rtol=1e-5, atol=1e-6)


def test_merge_parameters_is_weighted_average() -> None:
    bank = moekit.MLPExperts(3, 4, 6)
    probs = torch.softmax(torch.randn(5, 3), -1)
    merged = bank.merge_parameters(probs)
    for name, p in bank.stacked_parameters().items():
        torch.testing.assert_close(merged[name], torch.einsum("be,e...->b...", probs, p))


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without F.grouped_mm")
def test_bfloat16_dispatch_close_to_float32() -> None:
    router = moekit.TopKRouter(16, 4, 2, noisy=False)
    experts = moekit.GLUExperts(4, 16, 32)
    x = torch.randn(32, 16)
    ref = moekit.MoE(router, experts)(x).y
    y = moekit.MoE(router, experts.to(torch.bfloat16))(x.bfloat16()).y
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
