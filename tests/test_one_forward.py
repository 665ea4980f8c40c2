"""The one MoE forward and its parts: every layer is a ``moekit.MoE``; dispatchers are swappable without
touching the checkpoint; the fast merge dispatcher equals its reference; ``is_token_moe`` picks exactly
the layers the merging pipeline reduces."""

import pytest
import torch

import moekit
from moekit.layers import ExampleFeatures, MergeDispatch, SparseDispatch, TokenFeatures
from moekit.layers.cnn_moe import GAPGate
from moekit.layers.moe import is_token_moe
from moekit.layers.smear import PlainMergeDispatch
from moekit.models.multitask import MultiGateMoE, TaskSpec
from moekit.registry import DISPATCHERS


def test_dispatchers_are_registered() -> None:
    assert {"sparse", "dense", "merge", "all_to_all"} <= set(DISPATCHERS.names())
    assert all(e.paper.startswith("https://") for e in DISPATCHERS.entries())


def test_every_layer_is_one_moe_with_its_parts() -> None:
    smear = moekit.SMEAR(moekit.AdapterExperts(4, 8, 4), segment_len=2)
    res = moekit.ResBlockMoE(4, 4, num_experts=3, k=1)
    multi = MultiGateMoE(8, [TaskSpec("a", "classification", 2)], num_experts=3)
    remapped = moekit.RemappedMoE(moekit.TopKRouter(8, 4, 2), moekit.MLPExperts(2, 8, 8), torch.tensor([0, 1, 1, 0]))
    for layer in (smear, res, multi, remapped):
        assert isinstance(layer, moekit.MoE)
    assert isinstance(smear.features, ExampleFeatures) and smear.features.segment_len == 2
    assert isinstance(smear.dispatcher, MergeDispatch) and smear.combine == "merge"
    assert isinstance(res.features, TokenFeatures) and res.gate is not None and res.shortcut is not None
    assert multi.router is None and remapped.expert_map.tolist() == [0, 1, 1, 0]
    with pytest.raises(TypeError, match="no router of its own"):
        moekit.MoE.forward(multi, torch.randn(2, 8))


def test_is_token_moe_selects_what_merging_reduces() -> None:
    plain = moekit.MoE(moekit.TopKRouter(8, 4, 2), moekit.MLPExperts(4, 8, 8))
    remapped = moekit.RemappedMoE(moekit.TopKRouter(8, 4, 2), moekit.MLPExperts(2, 8, 8), torch.tensor([0, 1, 1, 0]))
    assert is_token_moe(plain) and is_token_moe(remapped)
    others = [moekit.SMEAR(moekit.MLPExperts(4, 8, 8)), moekit.ConvMoE(3, 4, num_experts=2, k=1),
              MultiGateMoE(8, [TaskSpec("a", "classification", 2)], num_experts=3), torch.nn.Linear(2, 2)]
    assert not any(is_token_moe(m) for m in others)


def test_swapping_the_dispatcher_keeps_the_state_dict() -> None:
    layer = moekit.MoE(moekit.TopKRouter(8, 4, 2), moekit.MLPExperts(4, 8, 8))
    keys = list(layer.state_dict())
    x = torch.randn(5, 8)
    y_sparse = layer.eval()(x).y
    layer.combine = "dense"
    assert list(layer.state_dict()) == keys and layer.combine == "dense"
    torch.testing.assert_close(layer(x).y, y_sparse, rtol=1e-5, atol=1e-6)
    layer.dispatcher = SparseDispatch()
    assert layer.combine == "sparse"


@pytest.mark.parametrize("segment_len", [None, 2])
def test_merge_dispatcher_equals_its_reference(segment_len: int | None) -> None:
    torch.manual_seed(0)
    fast = moekit.SMEAR(moekit.MLPExperts(4, 8, 16), segment_len=segment_len, expert_dropout=0.0, router_init_std=1.0,
                        merge_chunk_bytes=1)  # fmt: skip
    ref = moekit.SMEAR(moekit.MLPExperts(4, 8, 16), segment_len=segment_len, expert_dropout=0.0, router_init_std=1.0)
    ref.load_state_dict(fast.state_dict())
    ref.dispatcher = PlainMergeDispatch()
    x = torch.randn(3, 4, 8, requires_grad=True)
    y1 = fast(x).y
    g1 = torch.autograd.grad(y1.square().sum(), [x, *fast.parameters()])
    y2 = ref(x).y
    g2 = torch.autograd.grad(y2.square().sum(), [x, *ref.parameters()])
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_features_refuse_a_mask() -> None:
    layer = moekit.MoE(moekit.TopKRouter(8, 4, 2), moekit.MLPExperts(4, 8, 8))
    with pytest.raises(ValueError, match="mask is for per-example routing"):
        layer(torch.randn(2, 3, 8), mask=torch.ones(2, 3))


def test_per_example_features_take_no_gate() -> None:
    with pytest.raises(ValueError, match="a gate module goes with TokenFeatures"):
        moekit.MoE(moekit.TopKRouter(8, 4, 1), moekit.MLPExperts(4, 8, 8), features=ExampleFeatures(),
                   gate=GAPGate(8))  # fmt: skip
    with pytest.raises(TypeError, match="gate must have an int out_dim"):
        moekit.MoE(moekit.TopKRouter(8, 4, 1), moekit.MLPExperts(4, 8, 8), gate=torch.nn.Identity())
