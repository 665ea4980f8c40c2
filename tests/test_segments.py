"""Causal segment routing (Lory): segment k is routed on segment k-1; no token sees its future."""

import pytest
import torch

import moekit
from moekit.layers.baselines import build_routed_block
from moekit.layers.segments import causal_segment_groups, segment_sizes
from moekit.layers.smear import SMEAR


def _smear(first_segment: str, **kw) -> SMEAR:
    return SMEAR(moekit.GLUExperts(4, 8, 12), router_init_std=1.0, expert_dropout=0.0, segment_len=4,
                 first_segment=first_segment, **kw)  # fmt: skip


def test_segment_sizes() -> None:
    assert segment_sizes(11, 4) == [4, 4, 3]
    assert segment_sizes(8, 4) == [4, 4]
    assert segment_sizes(3, 8) == [3]
    with pytest.raises(ValueError, match="segment_len must be >= 1, got 0"):
        segment_sizes(3, 0)


def test_groups_route_on_the_previous_segment_mean() -> None:
    x = torch.randn(2, 10, 3)
    mask = torch.ones(2, 10)
    mask[1, :5] = 0  # left padding: example 1's first segment is all padding, its second half padding
    g = causal_segment_groups(x, mask, 4, "self")
    assert g.sizes_G.tolist() == [4, 4, 2, 4, 4, 2]
    assert g.example_G.tolist() == [0, 0, 0, 1, 1, 1]
    assert g.stop_grad_G.tolist() == [True, False, False, True, False, False]
    r = g.route_in_GD.reshape(2, 3, 3)
    torch.testing.assert_close(r[0, 0], x[0, :4].mean(0))  # first segment: itself
    torch.testing.assert_close(r[0, 1], x[0, :4].mean(0))
    torch.testing.assert_close(r[0, 2], x[0, 4:8].mean(0))
    torch.testing.assert_close(r[1, 1], torch.zeros(3))  # previous segment all padding -> zero mean
    torch.testing.assert_close(r[1, 2], x[1, 5:8].mean(0))  # only the real positions of segment 1
    default = causal_segment_groups(x, None, 4, "default")
    assert default.stop_grad_G is None
    torch.testing.assert_close(default.route_in_GD.reshape(2, 3, 3)[:, 0], torch.zeros(2, 3))


@pytest.mark.parametrize("first_segment", ["self", "default"])
@pytest.mark.parametrize("method", ["smear", "top1", "ensemble"])
def test_changing_future_tokens_does_not_change_earlier_outputs(first_segment: str, method: str) -> None:
    layer = build_routed_block(method, bank="glu", dim=8, num_experts=4, width=12, segment_len=4,
                               first_segment=first_segment, router_kwargs={"init_std": 1.0} if method != "top1" else None).eval()  # fmt: skip
    x = torch.randn(2, 11, 8)
    y = layer(x).y
    # "self": the first segment sees its own mean (Lory's choice); from the second segment on, strictly causal
    starts = range(0, 11) if first_segment == "default" else range(4, 11)
    for p in starts:
        x2 = x.clone()
        x2[:, p:] += 3 * torch.randn_like(x2[:, p:])
        torch.testing.assert_close(layer(x2).y[:, :p], y[:, :p])
    # and later segments do depend on earlier ones (routing is not constant)
    x3 = x.clone()
    x3[:, :4] += 3 * torch.randn_like(x3[:, :4])  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(layer(x3).y[:, 4:8], y[:, 4:8])


def test_causal_with_padding_mask() -> None:
    layer = _smear("default").eval()
    x = torch.randn(2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    y = layer(x, mask=mask).y
    x2 = x.clone()
    x2[0, 6:] = 50.0  # padding content never matters
    x2[:, 8:] += 1.0  # nor future tokens for earlier positions
    torch.testing.assert_close(layer(x2, mask=mask).y[0, :6], y[0, :6])
    torch.testing.assert_close(layer(x2, mask=mask).y[1, :8], y[1, :8])


def test_one_segment_self_routing_equals_per_example_smear() -> None:
    experts = moekit.GLUExperts(4, 8, 12)
    seg = SMEAR(experts, router_init_std=1.0, segment_len=16).eval()
    plain = SMEAR(experts, seg.router).eval()
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(seg(x).y, plain(x).y)


def test_gradient_reaches_the_router_except_through_the_first_segment() -> None:
    layer = _smear("self")
    layer(torch.randn(1, 4, 8)).y.sum().backward()  # one segment: routed on itself, stop-gradient
    assert layer.router.gate.weight.grad is None or layer.router.gate.weight.grad.abs().sum() == 0
    layer(torch.randn(1, 9, 8)).y.sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_decision_has_one_row_per_segment_and_meta_is_expanded() -> None:
    out = _smear("self")(torch.randn(3, 10, 8))
    assert out.decision.num_tokens == 3 * 3
    tag = build_routed_block("tag", dim=8, num_experts=4, width=4, segment_len=4)
    d = tag(torch.randn(2, 10, 8), meta={"tag": torch.tensor([1, 3])}).decision
    assert d.ids_TK[:, 0].tolist() == [1, 1, 1, 3, 3, 3]


def test_bad_input() -> None:
    layer = _smear("self")
    with pytest.raises(ValueError, match="empty sequences"):
        layer(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match=r"needs sequences \[B, L, 8\]"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match="all-padding"):
        layer(torch.randn(2, 5, 8), mask=torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="first_segment must be one of"):
        _smear("future")
    with pytest.raises(ValueError, match="segment_len must be >= 1"):
        SMEAR(moekit.GLUExperts(4, 8, 12), segment_len=0)
    with pytest.raises(ValueError, match="segment_len needs a token expert bank"):
        SMEAR(moekit.ConvExperts(4, 8, 8), segment_len=4)
