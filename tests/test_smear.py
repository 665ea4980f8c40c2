"""SMEAR, its per-example routing baselines and the discrete-routing gradient estimators."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moekit
from moekit.layers.baselines import ROUTED_METHODS, OutputEnsemble, SingleExpert, build_routed_block
from moekit.layers.example_routed import ExampleRoutedMoE
from moekit.experts.merged_linear import long_dots, merged_linear, merged_linear_reference
from moekit.layers.pooling import masked_mean
from moekit.layers.smear import SMEAR, PlainMergeDispatch, merged_forward, merged_forward_chunked, merged_forward_fused
from moekit.routers.base import Router
from moekit.routers.estimators import ReinforceRouter, STGumbelRouter, reinforce_terms
from moekit.routers.smear import SMEARRouter
from moekit.types import RoutingDecision

BANKS = {
    "adapter": lambda E: moekit.AdapterExperts(E, 8, 4),
    "mlp": lambda E: moekit.MLPExperts(E, 8, 12),
    "glu": lambda E: moekit.GLUExperts(E, 8, 12),
    "conv": lambda E: moekit.ConvExperts(E, 8, 8, 3),
}


def _input(bank: str, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 8, 5, 5) if bank == "conv" else torch.randn(batch, 6, 8)


class _Run(nn.Module):
    """Expert 0 of a bank as a module, so its parameters can be swapped with functional_call."""

    def __init__(self, bank: moekit.ExpertBank) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank.token_input:
            return self.bank.expert_forward(x.reshape(-1, x.shape[-1]), 0).reshape(*x.shape[:-1], -1)
        return self.bank.expert_forward(x, 0)


def _one_expert(bank: moekit.ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    params = {f"bank.{n}": p[e : e + 1] for n, p in bank.stacked_parameters().items()}
    return torch.func.functional_call(_Run(bank), params, (x,))


def _reference(bank: moekit.ExpertBank, x: torch.Tensor, probs_BE: torch.Tensor) -> torch.Tensor:
    """Naive SMEAR: per example, average the parameters with einsum and run them with plain ops."""
    outs = []
    for b in range(x.shape[0]):
        merged = {f"bank.{n}": torch.einsum("e,e...->...", probs_BE[b], p).unsqueeze(0)
                  for n, p in bank.stacked_parameters().items()}  # fmt: skip
        outs.append(torch.func.functional_call(_Run(bank), merged, (x[b : b + 1],)))
    return torch.cat(outs)


@pytest.mark.parametrize("bank", list(BANKS))
def test_merging_identical_experts_equals_one_expert(bank: str) -> None:
    experts = BANKS[bank](4)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(p[:1].expand_as(p))
    layer = SMEAR(experts, router_init_std=1.0).eval()
    x = _input(bank)
    torch.testing.assert_close(layer(x).y, _one_expert(experts, 0, x), rtol=1e-4, atol=1e-5)


class OneHotRouter(Router):
    is_sparse = False

    def __init__(self, e: int):
        super().__init__(8, 4, 4)
        self.e = e

    def route(self, x, meta):
        probs = torch.zeros(x.shape[0], 4)
        probs[:, self.e] = 1
        return RoutingDecision(torch.arange(4).expand(x.shape[0], 4), probs, 4, probs_TE=probs)


@pytest.mark.parametrize("bank", list(BANKS))
def test_one_hot_router_equals_that_expert(bank: str) -> None:
    experts = BANKS[bank](4)
    x = _input(bank)
    torch.testing.assert_close(SMEAR(experts, OneHotRouter(2))(x).y, _one_expert(experts, 2, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bank", list(BANKS))
def test_merge_matches_naive_reference_in_outputs_and_gradients(bank: str) -> None:
    experts = BANKS[bank](4)
    layer = SMEAR(experts, expert_dropout=0.0, router_init_std=1.0)
    x = _input(bank).requires_grad_()
    out = layer(x)
    ref = _reference(experts, x, out.decision.probs_TE)
    torch.testing.assert_close(out.y, ref, rtol=1e-4, atol=1e-5)
    params = [x, *experts.parameters(), *layer.router.parameters()]
    g1 = torch.autograd.grad(out.y.square().sum(), params, retain_graph=True)  # the graphs share the router
    g2 = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=5), budget=st.integers(1, 3), seed=st.integers(0, 100))
def test_chunked_merge_equals_plain_merge(sizes: list[int], budget: int, seed: int) -> None:
    torch.manual_seed(seed)
    experts = moekit.GLUExperts(3, 8, 4)
    sizes_G = torch.tensor(sizes)
    x = torch.randn(int(sizes_G.sum()), 8, requires_grad=True)
    logits = torch.randn(len(sizes), 3, requires_grad=True)
    per_group = moekit.layers.smear.merged_bytes_per_group(experts)
    y1 = merged_forward(experts, x, logits.softmax(-1), sizes_G)
    y2 = merged_forward_chunked(experts, x, logits.softmax(-1), sizes_G, max_bytes=budget * per_group)
    torch.testing.assert_close(y1, y2)
    if x.shape[0]:
        params = [x, logits, *experts.parameters()]
        g1 = torch.autograd.grad(y1.square().sum(), params)
        g2 = torch.autograd.grad(y2.square().sum(), params)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_smear_layer_chunks_under_a_small_budget_with_the_same_result() -> None:
    experts = moekit.GLUExperts(4, 8, 12)
    router = SMEARRouter(8, 4, init_std=1.0, expert_dropout=0.0)
    x = torch.randn(5, 6, 8, requires_grad=True)
    y1 = SMEAR(experts, router)(x).y
    y2 = SMEAR(experts, router, merge_chunk_bytes=1)(x).y  # one example per chunk, checkpointed
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.sum(), [x, *router.parameters()])
    g2 = torch.autograd.grad(y2.sum(), [x, *router.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _saved_for_backward_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond the layer's own parameters (unique storages)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).y.sum().backward()
    return sum(storages.values())


def _reference_smear(experts: moekit.ExpertBank, router: SMEARRouter, **kwargs) -> SMEAR:
    """SMEAR on the plain reference path (every example's merged copy built at once and kept)."""
    layer = SMEAR(experts, router, **kwargs)
    layer.dispatcher = PlainMergeDispatch()
    return layer


def test_fused_and_chunked_merges_keep_less_for_backward() -> None:
    experts = moekit.MLPExperts(4, 32, 256)  # merged FFN parameters dominate at short sequences
    router = SMEARRouter(32, 4, expert_dropout=0.0)
    x = torch.randn(8, 4, 32, requires_grad=True)
    per_example = moekit.layers.smear.merged_bytes_per_group(experts)
    plain = _saved_for_backward_bytes(_reference_smear(experts, router), x)
    fused = _saved_for_backward_bytes(SMEAR(experts, router, merge_chunk_bytes=2 * per_example), x)
    conv = moekit.ConvExperts(4, 8, 64, 3)  # no fused path: the checkpointed chunks bound it
    xc = torch.randn(8, 8, 3, 3, requires_grad=True)
    per_image = moekit.layers.smear.merged_bytes_per_group(conv)
    conv_plain = _saved_for_backward_bytes(_reference_smear(conv, SMEARRouter(8, 4)), xc)
    conv_chunked = _saved_for_backward_bytes(SMEAR(conv, SMEARRouter(8, 4), merge_chunk_bytes=2 * per_image), xc)
    assert plain > 8 * per_example  # every example's merged copy is kept
    assert fused < 2 * per_example  # only inputs and routing weights are kept; merges are redone in backward
    assert conv_plain > 8 * per_image and conv_chunked < 3 * per_image


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(1, 9), st.integers(1, 4)),
    chunk_rows=st.integers(1, 10),
    bias=st.booleans(),
    needs=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 100),
)
def test_merged_linear_matches_reference_in_outputs_and_gradients(shape, chunk_rows, bias, needs, seed) -> None:
    G, S, I, O, E = shape
    torch.manual_seed(seed)
    x = torch.randn(G, S, I, dtype=torch.float64, requires_grad=needs[0])
    probs = torch.randn(G, E, dtype=torch.float64).softmax(-1).requires_grad_(needs[1])
    w = torch.randn(E, O, I, dtype=torch.float64, requires_grad=needs[2])
    b = torch.randn(E, O, dtype=torch.float64, requires_grad=needs[3]) if bias else None
    y = merged_linear(x, probs, w, b, chunk_bytes=chunk_rows * G * I * 8)  # chunk_rows rows of W per chunk
    ref = merged_linear_reference(x, probs, w, b)
    torch.testing.assert_close(y, ref)
    inputs = [t for t in (x, probs, w, b) if t is not None and t.requires_grad]
    if inputs:
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
            torch.testing.assert_close(a, r)


@pytest.mark.parametrize("K", [4096, 3 * 1024, 1000, 7])
def test_long_dots_equal_the_matmul(K: int) -> None:
    """The blocked form (K with at least 64 blocks) and the plain GEMM (K = 1000, 7) give ``a @ b^T``; ``a``
    may be a column slice, as the backward's weight chunks are."""
    a = torch.randn(8, 2 * K, dtype=torch.float64)[:, K:]
    b = torch.randn(5, K, dtype=torch.float64)
    torch.testing.assert_close(long_dots(a, b), a @ b.T)


def test_merged_linear_gradient_of_probs_through_long_chunks() -> None:
    """Chunks whose n * I inner dimension takes the blocked dot products (I = 128: 1024 blocks)."""
    G, S, I, O, E = 3, 4, 128, 16, 4
    x = torch.randn(G, S, I, dtype=torch.float64)
    probs = torch.randn(G, E, dtype=torch.float64).softmax(-1).requires_grad_()
    w = torch.randn(E, O, I, dtype=torch.float64, requires_grad=True)
    y, ref = merged_linear(x, probs, w, chunk_bytes=8 * G * I * 8), merged_linear_reference(x, probs, w)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(y, (probs, w), g), torch.autograd.grad(ref, (probs, w), g)):
        torch.testing.assert_close(a, r)


GRAD_LAYOUTS = {
    "contiguous": lambda G, S, O: torch.randn(G, S, O, dtype=torch.float64),
    "broadcast": lambda G, S, O: torch.randn(1, 1, O, dtype=torch.float64).expand(G, S, O),  # e.g. from y.sum(0)
    "permuted": lambda G, S, O: torch.randn(S, O, G, dtype=torch.float64).permute(2, 0, 1),
    "every_other_feature": lambda G, S, O: torch.randn(G, S, 2 * O, dtype=torch.float64)[..., ::2],
}


@pytest.mark.parametrize("layout", list(GRAD_LAYOUTS))
@pytest.mark.parametrize("bias", [False, True])
def test_merged_linear_backward_reads_any_output_gradient_layout(layout: str, bias: bool) -> None:
    """Backward slices the output gradient per chunk without copying it: strided, broadcast and
    non-BLAS layouts give the reference's gradients."""
    G, S, I, O, E = 3, 5, 6, 7, 4
    torch.manual_seed(0)
    x = torch.randn(G, S, I, dtype=torch.float64, requires_grad=True)
    probs = torch.randn(G, E, dtype=torch.float64).softmax(-1).requires_grad_()
    w = torch.randn(E, O, I, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, O, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [t for t in (x, probs, w, b) if t is not None]
    g = GRAD_LAYOUTS[layout](G, S, O)
    y = merged_linear(x, probs, w, b, chunk_bytes=3 * G * I * 8)  # chunks of 3, 3 and 1 rows of W
    ref = merged_linear_reference(x, probs, w, b)
    for a, r in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("between", ["nothing", "same_shape", "larger", "backward_twice"])
def test_merged_linear_reuses_the_last_merged_chunk_only_while_the_buffer_holds_it(between: str) -> None:
    """Backward starts with the chunk forward merged last and skips its re-merge when the scratch buffer
    still holds it; any other merged_linear call in between (same or larger buffer) forces the re-merge."""
    G, S, I, O, E = 3, 4, 5, 7, 4
    torch.manual_seed(0)

    def case() -> list[torch.Tensor]:
        return [torch.randn(G, S, I, dtype=torch.float64, requires_grad=True),
                torch.randn(G, E, dtype=torch.float64).softmax(-1).requires_grad_(),
                torch.randn(E, O, I, dtype=torch.float64, requires_grad=True)]  # fmt: skip

    inputs = case()
    y = merged_linear(*inputs, chunk_bytes=3 * G * I * 8)  # chunks of 3, 3 and 1 rows: the last one is partial
    x2, p2, w2 = case()
    if between == "same_shape":
        merged_linear(x2, p2, w2, chunk_bytes=3 * G * I * 8)
    elif between == "larger":  # twice the groups: a larger buffer replaces the one forward wrote
        merged_linear(torch.cat([x2, x2]), torch.cat([p2, p2]), w2, chunk_bytes=3 * 2 * G * I * 8)
    g = torch.randn(G, S, O, dtype=torch.float64)
    expected = torch.autograd.grad(merged_linear_reference(*inputs), inputs, g)
    if between == "backward_twice":
        torch.autograd.grad(y, inputs, g, retain_graph=True)
    for a, r in zip(torch.autograd.grad(y, inputs, g), expected):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_linear_matches_a_float64_reference_in_low_precision(dtype: torch.dtype) -> None:
    """fp32 and bf16 outputs and gradients within the dtype's rounding of a float64 reference on the same
    values, relative to the largest reference value (long bf16 sums round at that scale, not per element)."""
    G, S, I, O, E = 4, 8, 16, 24, 3
    torch.manual_seed(0)
    values = [torch.randn(G, S, I), torch.randn(G, E).softmax(-1), torch.randn(E, O, I), torch.randn(E, O)]
    fast = [v.to(dtype).requires_grad_() for v in values]
    fast[1] = values[1].clone().requires_grad_()  # fp32 router output, cast to the weights' dtype inside
    exact = [v.detach().double().requires_grad_() for v in fast]
    g = torch.randn(G, S, O)
    y = merged_linear(*fast, chunk_bytes=5 * G * I * fast[0].element_size())  # chunks of 5 rows of W
    ref = merged_linear_reference(*exact)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    results = [y, *torch.autograd.grad(y, fast, g.to(dtype))]
    references = [ref, *torch.autograd.grad(ref, exact, g.double())]
    for a, r in zip(results, references):
        a, r = a.detach().double(), r.detach()
        assert float((a - r).abs().max()) <= rtol * float(r.abs().max())


@pytest.mark.parametrize("bank", ["adapter", "mlp", "glu"])
def test_fused_smear_path_matches_the_plain_merge(bank: str) -> None:
    torch.manual_seed(0)
    experts = BANKS[bank](4)
    x = torch.randn(12, 8, requires_grad=True)  # 3 groups of 4 rows
    logits = torch.randn(3, 4, requires_grad=True)
    sizes = torch.tensor([4, 4, 4])
    fused = merged_forward_fused(experts, x, logits.softmax(-1), sizes, max_bytes=1)  # one row of W per chunk
    ref = merged_forward(experts, x, logits.softmax(-1), sizes)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-6)
    params = [x, logits, *experts.parameters()]
    for a, r in zip(torch.autograd.grad(fused.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_fused_path_declines_other_banks_and_unequal_groups() -> None:
    probs = torch.full((2, 4), 0.25)
    assert merged_forward_fused(BANKS["mlp"](4), torch.randn(7, 8), probs, torch.tensor([3, 4])) is None
    assert merged_forward_fused(BANKS["conv"](4), torch.randn(2, 8, 5, 5), probs, torch.tensor([1, 1])) is None
    x = torch.randn(2, 6, 8, requires_grad=True)
    for seg in (4, 3):  # 6 = 4 + 2: unequal segments take the checkpointed path; 6 = 3 + 3: the fused one
        layer = SMEAR(BANKS["mlp"](4), segment_len=seg, expert_dropout=0.0, router_init_std=1.0, merge_chunk_bytes=1)
        ref = _reference_smear(layer.experts, layer.router, segment_len=seg)
        y, y_ref = layer(x).y, ref(x).y
        torch.testing.assert_close(y, y_ref)
        params = [x, *layer.parameters()]
        for a, r in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(y_ref.square().sum(), params)):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_position_mean_has_a_cheap_exact_gradient() -> None:
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(masked_mean, (x,)) and torch.autograd.gradgradcheck(masked_mean, (x,))
    (grad,) = torch.autograd.grad(masked_mean(x).sum(), x)
    assert grad.stride(1) == 0  # broadcast over positions, not materialised


def test_equal_size_groups_use_batched_matmul_matching_the_reference() -> None:
    from moekit.experts.grouped import grouped_linear, grouped_linear_reference

    x = torch.randn(12, 5, requires_grad=True)
    w = torch.randn(3, 7, 5, requires_grad=True)
    b = torch.randn(3, 7, requires_grad=True)
    sizes = torch.tensor([4, 4, 4])
    y, ref = grouped_linear(x, w, sizes, b), grouped_linear_reference(x, w, sizes, b)
    torch.testing.assert_close(y, ref)
    for g1, g2 in zip(torch.autograd.grad(y.square().sum(), [x, w, b]), torch.autograd.grad(ref.square().sum(), [x, w, b])):
        torch.testing.assert_close(g1, g2)


def test_padding_does_not_change_routing_or_real_positions() -> None:
    layer = SMEAR(moekit.AdapterExperts(4, 8, 4), router_init_std=1.0).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    x2 = x.clone()
    x2[0, 4:] = 100.0  # garbage in the padding
    a, b = layer(x, mask=mask), layer(x2, mask=mask)
    torch.testing.assert_close(a.decision.probs_TE, b.decision.probs_TE)
    torch.testing.assert_close(a.y[0, :4], b.y[0, :4])
    torch.testing.assert_close(layer(x[:1, :4]).y, a.y[:1, :4])  # = the unpadded example


def test_masked_mean_ignores_padding_and_rejects_bad_masks() -> None:
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(masked_mean(x, mask)[0], x[0, :2].mean(0))
    torch.testing.assert_close(masked_mean(x, mask.bool())[1], x[1].mean(0))
    with pytest.raises(ValueError, match=r"examples \[0\] have an all-padding mask"):
        masked_mean(x, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="empty sequences"):
        masked_mean(torch.randn(2, 0, 3), None)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        masked_mean(x, torch.ones(2, 3))


def test_router_starts_near_uniform_and_expert_dropout_renormalises() -> None:
    router = SMEARRouter(16, 8, expert_dropout=0.5)
    d = router.eval()(torch.randn(32, 16))
    assert (d.probs_TE - 1 / 8).abs().max() < 0.05
    w = router.train()(torch.randn(32, 16)).weights_TK
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert (w == 0).any()
    torch.testing.assert_close(router.eval()(torch.randn(4, 16)).weights_TK.sum(-1), torch.ones(4))


@pytest.mark.parametrize("method", list(ROUTED_METHODS))
@pytest.mark.parametrize("bank", ["adapter", "glu"])
def test_every_method_runs_and_trains_a_step(method: str, bank: str) -> None:
    block = build_routed_block(method, bank=bank, dim=8, num_experts=4, width=4, num_keys=10)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5])
    out = block.train()(x, mask=mask, meta={"tag": torch.tensor([0, 1, 3]), "example_ids": torch.tensor([1, 2, 3])})
    assert out.y.shape == x.shape and out.decision.num_tokens == 3
    loss = out.y.square().mean()
    if method == "reinforce":
        loss = loss + sum(reinforce_terms(out.decision, out.y.square().mean((1, 2))).values())
    loss.backward()
    assert all(p.grad is not None for p in block.experts.parameters())
    if method in ("smear", "ensemble", "top1", "st_gumbel", "reinforce", "dselect"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.router.parameters())


def test_tag_routing_runs_the_tagged_expert() -> None:
    block = build_routed_block("tag", dim=8, num_experts=4, width=4).eval()
    x = torch.randn(2, 5, 8)
    y = block(x, meta={"tag": torch.tensor([3, 1])}).y
    torch.testing.assert_close(y[0], _one_expert(block.experts, 3, x[:1])[0])
    torch.testing.assert_close(y[1], _one_expert(block.experts, 1, x[1:])[0])


def test_top1_scales_the_output_by_its_probability() -> None:
    block = build_routed_block("top1", dim=8, num_experts=4, width=4).eval()
    x = torch.randn(2, 5, 8)
    out = block(x)
    e, p = out.decision.ids_TK[:, 0], out.decision.weights_TK[:, 0]
    for b in range(2):
        torch.testing.assert_close(out.y[b], p[b] * _one_expert(block.experts, int(e[b]), x[b : b + 1])[0])
        torch.testing.assert_close(p[b], out.decision.probs_TE[b].max())


def test_ensemble_mixes_expert_outputs_with_the_router_probabilities() -> None:
    block = OutputEnsemble(moekit.MLPExperts(3, 8, 6), router_init_std=1.0).eval()
    x = torch.randn(2, 4, 8)
    out = block(x)
    ref = sum(out.decision.probs_TE[:, e, None, None] * _one_expert(block.experts, e, x) for e in range(3))
    torch.testing.assert_close(out.y, ref)


def test_parameter_and_compute_matched_baselines() -> None:
    smear = build_routed_block("smear", dim=8, num_experts=4, width=4)
    one = build_routed_block("dense_1x_compute", dim=8, num_experts=4, width=4)
    wide = build_routed_block("dense_1x_params", dim=8, num_experts=4, width=4)
    assert isinstance(one, SingleExpert) and isinstance(wide, SingleExpert)
    n = lambda m: sum(p.numel() for p in m.experts.parameters())  # noqa: E731
    assert n(one) * 4 == n(smear)  # 1x compute: one expert of the same size
    assert n(wide) == n(smear) - 3 * 8  # 1x parameters: 4x wider, sharing one output bias
    assert wide.experts.bottleneck == 16
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(one(x).y, _one_expert(one.experts, 0, x))


def test_st_gumbel_anneals_and_is_straight_through() -> None:
    router = STGumbelRouter(8, 4, tau_start=10.0, tau_min=0.5, decay=0.1).train()
    d = router(torch.randn(6, 8))
    torch.testing.assert_close(d.weights_TK, torch.ones(6, 1))
    d.weights_TK.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    for _ in range(100):
        router(torch.randn(6, 8))
    assert router.temperature == 0.5
    fresh = STGumbelRouter(8, 4, tau_start=10.0, tau_min=0.5, decay=0.1)
    fresh.load_state_dict(router.state_dict())
    assert fresh.temperature == 0.5
    x = torch.randn(6, 8)
    torch.testing.assert_close(fresh.eval()(x).ids_TK[:, 0], fresh.gate(x).argmax(-1))


def test_reinforce_terms_push_towards_better_choices() -> None:
    torch.manual_seed(0)
    router = ReinforceRouter(8, 2).train()
    x = torch.cat([torch.randn(32, 7), torch.ones(32, 1)], 1)  # a constant feature acts as a router bias
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    start = float(router.eval()(x).probs_TE[:, 0].mean().detach())
    router.train()
    for _ in range(60):
        opt.zero_grad()
        d = router(x)
        t = reinforce_terms(d, (d.ids_TK[:, 0] == 1).float())  # choosing expert 1 is costly
        (t["policy"] + t["value"]).backward()
        opt.step()
    assert router.eval()(x).probs_TE[:, 0].mean() > max(0.75, float(start) + 0.2)
    with pytest.raises(ValueError, match="ReinforceRouter in training mode"):
        reinforce_terms(router.eval()(x), torch.zeros(32))
    with pytest.raises(ValueError, match=r"loss_T must have shape \(32,\)"):
        reinforce_terms(router.train()(x), torch.zeros(31))


def test_estimators_are_registered() -> None:
    assert {"smear", "st_gumbel", "reinforce"} <= set(moekit.list_routers())
    assert isinstance(moekit.create_router("st_gumbel", dim=4, num_experts=3), STGumbelRouter)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="method must be one of .* got 'nope'"):
        build_routed_block("nope", dim=8, num_experts=4, width=4)
    block = build_routed_block("tag", dim=8, num_experts=4, width=4)
    with pytest.raises(ValueError, match=r"meta\['tag'\] has 2 entries but the batch has 3"):
        block(torch.randn(3, 5, 8), meta={"tag": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"needs meta\['tag'\]"):
        block(torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="num_keys"):
        build_routed_block("hash", dim=8, num_experts=4, width=4)
    smear = SMEAR(moekit.AdapterExperts(4, 8, 4))
    with pytest.raises(ValueError, match="empty sequences"):
        smear(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="empty batch"):
        smear(torch.randn(0, 3, 8))
    with pytest.raises(ValueError, match="all-padding"):
        smear(torch.randn(2, 3, 8), mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"input must be \[B, S, 8\]"):
        smear(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="sparse router TopKRouter"):
        SMEAR(moekit.AdapterExperts(4, 8, 4), moekit.TopKRouter(8, 4, 1))
    with pytest.raises(ValueError, match="router has num_experts=3 but experts has num_experts=4"):
        ExampleRoutedMoE(moekit.TopKRouter(8, 3, 1), moekit.AdapterExperts(4, 8, 4))
    with pytest.raises(ValueError, match="all-padding"):
        build_routed_block("dense_1x_compute", dim=8, num_experts=4, width=4)(
            torch.randn(1, 3, 8), mask=torch.zeros(1, 3))
