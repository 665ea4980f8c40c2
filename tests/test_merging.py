"""Expert merging: budgets, grouping, merging, both output forms, and bad input."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moekit
from moekit.merging import (
    ExpertLayerWeights,
    allocate_experts,
    calibrate,
    fold_router,
    merge_groups,
    merge_layer,
    merge_moekit_model,
    read_moe_layer,
)
from moekit.registry import MERGE_METHODS

METHODS = ["mcsmoe", "prune", "uniform", "random"]


def _moe(kind: str = "glu", E: int = 6, D: int = 8, k: int = 2, identical: bool = False) -> moekit.MoE:
    bank = moekit.GLUExperts(E, D, 16) if kind == "glu" else moekit.MLPExperts(E, D, 16)
    if identical:
        with torch.no_grad():
            for p in bank.stacked_parameters().values():
                p.copy_(p[0:1].expand_as(p))
    return moekit.MoE(moekit.TopKRouter(D, E, k, noisy=False), bank).eval()


def test_merge_methods_are_registered() -> None:
    assert set(METHODS) <= set(MERGE_METHODS.names())
    assert all(MERGE_METHODS.entry(m).paper for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["exact", "plain"])
@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_merging_identical_experts_is_exact(method: str, form: str, kind: str) -> None:
    moe = _moe(kind, identical=True)
    x = torch.randn(64, 8)
    merged = merge_moekit_model(moe, [x], experts=2, method=method, form=form, quiet=True)
    assert merged.experts.num_experts == 2
    with torch.no_grad():
        torch.testing.assert_close(merged(x).y, moe(x).y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_exact_form_reproduces_the_redirect_model(method: str, kind: str) -> None:
    moe = _moe(kind, E=8)
    x = torch.randn(96, 8)
    merged = merge_moekit_model(moe, [x], experts=3, method=method, form="exact", quiet=True)
    assert isinstance(merged, moekit.RemappedMoE)
    # redirect model: E experts, expert e holds the merged expert expert_map[e]; router unchanged
    redirect = copy.deepcopy(moe)
    with torch.no_grad():
        for name, p in redirect.experts.stacked_parameters().items():
            p.copy_(getattr(merged.experts, name)[merged.expert_map])
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y, ref = merged(xg).y, redirect(xr).y
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xg, g)[0], torch.autograd.grad(ref, xr, g)[0])
    torch.testing.assert_close(merged.router.gate.weight, moe.router.gate.weight)  # router unchanged


def test_plain_form_is_a_standard_smaller_moe() -> None:
    moe = _moe("glu", E=8, k=2)
    x = torch.randn(64, 8)
    merged = merge_moekit_model(moe, [x], experts=3, form="plain", quiet=True)
    assert type(merged) is moekit.MoE
    assert merged.router.num_experts == merged.experts.num_experts == 3
    assert merged.router.gate.weight.shape == (3, 8)
    assert merged(x).y.shape == x.shape


def test_merge_never_modifies_its_input() -> None:
    moe = _moe()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    merge_moekit_model(moe, [torch.randn(32, 8)], experts=2, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())


def test_frequency_weighted_merge_is_the_weighted_average() -> None:
    params = {"w": torch.randn(4, 3, 2)}
    groups = torch.tensor([0, 1, 0, 1])
    alpha = torch.tensor([1.0, 2.0, 3.0, 0.0])
    out = merge_groups(params, groups, 2, alpha)["w"]
    torch.testing.assert_close(out[0], (params["w"][0] + 3 * params["w"][2]) / 4)
    torch.testing.assert_close(out[1], params["w"][1])
    zero = merge_groups(params, groups, 2, torch.zeros(4))["w"]  # never-used group: uniform
    torch.testing.assert_close(zero[0], (params["w"][0] + params["w"][2]) / 2)


def test_merge_layer_groups_dominant_experts_and_orders_groups() -> None:
    moe = _moe(E=6)
    w = read_moe_layer(moe)
    freq = torch.tensor([5.0, 1.0, 9.0, 0.0, 7.0, 2.0])
    logits = torch.randn(50, 6)
    result = merge_layer(w, freq, logits, 3)
    assert result.dominant.tolist() == [0, 2, 4]
    assert result.expert_map[result.dominant].tolist() == [0, 1, 2]
    assert result.weights.num_experts == 3
    # router-logit grouping: a column equal to a dominant's column joins that dominant
    logits[:, 3] = 2 * logits[:, 4]
    assert int(merge_layer(w, freq, logits, 3).expert_map[3]) == 2
    prune = merge_layer(w, freq, logits, 3, method="prune")
    for name, p in w.params.items():
        torch.testing.assert_close(prune.weights.params[name], p[prune.dominant])


def test_first_anchor_aligns_each_group_to_its_lowest_member() -> None:
    from moekit.merging import align_experts

    w = read_moe_layer(_moe(E=6))
    freq = torch.tensor([5.0, 1.0, 9.0, 0.5, 7.0, 2.0])
    logits = torch.randn(60, 6)
    got = merge_layer(w, freq, logits, 3, anchor="first")
    groups = got.expert_map
    anchors = torch.tensor([min(j for j in range(6) if groups[j] == groups[e]) for e in range(6)])  # naive
    want = merge_groups(align_experts(w, anchors).params, groups, 3, freq.double())
    for name, value in want.items():
        torch.testing.assert_close(got.weights.params[name], value)
    dominant = merge_layer(w, freq, logits, 3, anchor="dominant")
    assert torch.equal(dominant.expert_map, groups)
    if not torch.equal(anchors, got.dominant[groups]):  # a group led by a higher id: a different alignment
        assert any(not torch.equal(got.weights.params[n], dominant.weights.params[n]) for n in want)
    with pytest.raises(ValueError, match="anchor must be 'dominant', 'first' or an expert id"):
        merge_layer(w, freq, logits, 3, anchor="last")


def test_merge_layer_rejects_bad_counts_and_inputs() -> None:
    w = read_moe_layer(_moe(E=6))
    freq, logits = torch.rand(6) + 0.1, torch.randn(10, 6)
    with pytest.raises(ValueError, match="num_groups must be <= 6, got 7"):
        merge_layer(w, freq, logits, 7)
    with pytest.raises(ValueError, match="num_groups must be >= 1, got 0"):
        merge_layer(w, freq, logits, 0)
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merge_layer(w, freq, logits, 2, method="nope")
    with pytest.raises(ValueError, match="never reached"):
        merge_layer(w, torch.zeros(6), logits, 2)
    with pytest.raises(ValueError, match="calib_inputs_TD"):
        merge_layer(w, freq, logits, 2, grouping="expert_output")
    with pytest.raises(ValueError, match=r"router_logits_TE must be \[T, E=6\]"):
        merge_layer(w, freq, torch.randn(10, 5), 2)


def test_merge_moekit_model_rejects_bad_expert_counts() -> None:
    moe = _moe(E=6)
    with pytest.raises(ValueError, match="experts must be <= 6, got 7"):
        merge_moekit_model(moe, [torch.randn(8, 8)], experts=7, quiet=True)
    with pytest.raises(ValueError, match="experts must be >= 1, got 0"):
        merge_moekit_model(moe, [torch.randn(8, 8)], experts=0, quiet=True)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _moe(), _moe()

    def forward(self, x: torch.Tensor, skip_second: bool = True) -> torch.Tensor:
        y = self.first(x).y
        return y if skip_second else self.second(y).y


def test_calibration_that_never_reaches_a_layer_is_an_error() -> None:
    model = _TwoLayers()
    with pytest.raises(ValueError, match=r"never reached MoE blocks \['second'\]"):
        merge_moekit_model(model, [torch.randn(8, 8)], experts=2, quiet=True)
    merged = merge_moekit_model(model, [torch.randn(8, 8)], experts=2, exclude=["second"], quiet=True,
                                forward=lambda m, b: m(b))  # fmt: skip
    assert merged.first.experts.num_experts == 2 and merged.second.experts.num_experts == 6
    specs = {"counts": {}, "router_logits": {}, "router_inputs": {}}
    stats = calibrate(model, [torch.randn(8, 8)], statistics=specs, forward=lambda m, b: m(b, skip_second=False))
    assert stats["second"]["router_inputs"]["inputs"].shape == (8, 8)
    assert stats["second"]["router_logits"]["logits"].shape == (8, 6)
    assert stats["second"]["counts"]["counts"].sum() == 8 * 2


def test_allocate_experts_global_budget() -> None:
    freqs = {"a": torch.tensor([10.0, 0, 0, 0]), "b": torch.tensor([1.0, 1, 1, 1]), "c": torch.tensor([3.0, 1, 0, 0])}
    counts = allocate_experts(freqs, total=6)
    assert sum(counts.values()) == 6 and counts["a"] >= 1 and counts["b"] == 4
    assert allocate_experts(freqs, per_layer=2) == {"a": 2, "b": 2, "c": 2}
    assert allocate_experts(freqs, total=3, exclude={"b"})["b"] == 4
    with pytest.raises(ValueError, match="exactly one of total and per_layer"):
        allocate_experts(freqs)
    with pytest.raises(ValueError, match="total must be >= 3, got 2"):
        allocate_experts(freqs, total=2)
    with pytest.raises(ValueError, match="per_layer must be <= 4, got 5"):
        allocate_experts(freqs, per_layer=5)
    with pytest.raises(ValueError, match="not in frequencies"):
        allocate_experts(freqs, total=4, exclude={"z"})


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10), min_size=1, max_size=6), min_size=1, max_size=4), st.data())
def test_allocate_experts_property(layers: list[list[float]], data: st.DataObject) -> None:
    freqs = {i: torch.tensor(f) + torch.tensor([1e-3] + [0.0] * (len(f) - 1)) for i, f in enumerate(layers)}
    total = data.draw(st.integers(len(layers), sum(len(f) for f in layers)))
    counts = allocate_experts(freqs, total=total)
    assert sum(counts.values()) == total
    assert all(1 <= counts[i] <= len(f) for i, f in enumerate(layers))


def test_fold_router_keeps_singletons_and_fits_log_sum_exp() -> None:
    torch.manual_seed(1)
    W, x = torch.randn(5, 8), torch.randn(400, 8)
    logits = x @ W.t()
    groups, dominant = torch.tensor([0, 0, 1, 0, 2]), torch.tensor([0, 2, 4])
    folded, _ = fold_router(W, None, groups, dominant, logits)
    torch.testing.assert_close(folded[1:].double(), W[[2, 4]].double())
    lse = torch.logsumexp(logits[:, [0, 1, 3]], dim=1)
    fit_err = (x @ folded[0] - lse).pow(2).mean()
    assert fit_err < (logits[:, 0] - lse).pow(2).mean()  # better than keeping the dominant row
    # two identical rows with a router bias: the fit is exact (log-sum-exp = logit + log 2)
    W2, b2 = W[[0, 0]], torch.tensor([0.5, 0.5])
    f2, fb2 = fold_router(W2, b2, torch.tensor([0, 0]), torch.tensor([0]), x @ W2.t() + b2)
    torch.testing.assert_close(x @ f2[0] + fb2[0], x @ W2[0] + 0.5 + torch.log(torch.tensor(2.0)), rtol=1e-3, atol=1e-3)


def test_expert_output_grouping_through_the_model() -> None:
    moe = _moe(E=6)
    merged = merge_moekit_model(moe, [torch.randn(40, 8)], experts=2, grouping="expert_output", quiet=True)
    assert merged.experts.num_experts == 2


def test_hand_off_types_validate() -> None:
    with pytest.raises(ValueError, match="agree on the expert count"):
        ExpertLayerWeights("glu", {"gate_up_proj": torch.zeros(3, 4, 2), "down_proj": torch.zeros(3, 2, 2)}, torch.zeros(4, 2))
