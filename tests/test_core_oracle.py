"""Fast paths against the naive references: outputs and gradients."""

import pytest
import torch

import moekit
from moekit.experts import dispatch, dispatch_reference, grouped_linear, grouped_linear_reference
from moekit.routers.base import Router
from moekit.types import RoutingDecision


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads)]


@pytest.mark.parametrize("sizes", [[3, 0, 5], [0, 0, 4], [8], [0, 7, 0, 1], [2, 2, 2, 2]])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dims", [(8, 12), (6, 5)])  # aligned (fused kernel) and unaligned (fallback)
def test_grouped_linear_matches_reference(sizes: list[int], fast: bool, dims: tuple[int, int]) -> None:
    I, O = dims
    if fast and (I % 4 or O % 4):
        pytest.skip("fused kernel needs 16-byte aligned strides")
    s = torch.tensor(sizes)
    x = torch.randn(int(s.sum()), I, requires_grad=True)
    w = torch.randn(len(sizes), O, I, requires_grad=True)
    b = torch.randn(len(sizes), O, requires_grad=True)
    y = grouped_linear(x, w, s, b, fast=fast)
    ref = grouped_linear_reference(x, w, s, b)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for a, r in zip(_grads(y, [x, w, b], g), _grads(ref, [x, w, b], g)):
        torch.testing.assert_close(a, r)


def _bank(name: str, E: int, D: int) -> moekit.ExpertBank:
    if name == "mlp":
        return moekit.MLPExperts(E, D, 12)
    if name == "glu":
        return moekit.GLUExperts(E, D, 12)
    if name == "adapter":
        return moekit.AdapterExperts(E, D, 4)
    return moekit.ConvExperts(E, D, 4, 3)


def _inputs(name: str, T: int, D: int) -> torch.Tensor:
    shape = (T, D, 5, 5) if name == "conv" else (T, D)
    return torch.randn(*shape, requires_grad=True)


class FixedRouter(Router):
    """Routes by a fixed ids/weights table, with a learnable scale so router gradients exist."""

    def __init__(self, dim: int, ids: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor | None, E: int):
        super().__init__(dim, E, ids.shape[1])
        self.ids, self.w, self.kept = ids, torch.nn.Parameter(weights.clone()), kept

    def route(self, x, meta):
        return RoutingDecision(self.ids, self.w * 1.0, self.num_experts, kept_TK=self.kept)


CASES = {
    "empty_expert": (4, 2, lambda T: torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 3)], 1), None),
    "single_expert": (1, 1, lambda T: torch.zeros(T, 1, dtype=torch.long), None),
    "k_equals_E": (3, 3, lambda T: torch.arange(3).expand(T, 3).clone(), None),
    "dropped": (4, 2, lambda T: torch.randint(0, 4, (T, 2)), lambda T: torch.rand(T, 2) > 0.4),
}


@pytest.mark.parametrize("bank", ["mlp", "glu", "adapter", "conv"])
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_matches_loop(bank: str, case: str) -> None:
    E, K, make_ids, make_kept = CASES[case]
    T, D = 9, 8
    experts = _bank(bank, E, D)
    x = _inputs(bank, T, D)
    ids = make_ids(T)
    if K > 1 and case != "k_equals_E":
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1])
    kept = make_kept(T) if make_kept else None
    weights = torch.softmax(torch.randn(T, K), -1).requires_grad_()
    decision = RoutingDecision(ids, weights, E, kept_TK=kept)
    y = dispatch(experts, x, decision)
    ref = dispatch_reference(experts, x, decision)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    params = [x, weights, *experts.parameters()]
    g = torch.randn_like(ref)
    for a, r in zip(_grads(y, params, g), _grads(ref, params, g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice", "softmax"])
def test_moe_layer_sparse_equals_dense_combine(router: str) -> None:
    kwargs = {"k": 2} if router == "topk" else {}
    if router == "switch":
        kwargs = {"capacity_factor": None}
    r = moekit.create_router(router, dim=8, num_experts=4, **kwargs).eval()
    experts = moekit.GLUExperts(4, 8, 16)
    sparse, dense = moekit.MoE(r, experts), moekit.MoE(r, experts, combine="dense")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(sparse(x).y, dense(x).y, rtol=1e-4, atol=1e-5)


def test_merge_parameters_is_weighted_average() -> None:
    bank = moekit.MLPExperts(3, 4, 6)
    probs = torch.softmax(torch.randn(5, 3), -1)
    merged = bank.merge_parameters(probs)
    for name, p in bank.stacked_parameters().items():
        torch.testing.assert_close(merged[name], torch.einsum("be,e...->b...", probs, p))
