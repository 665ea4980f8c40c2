"""Permutation alignment by weight matching: function preserved, known permutations recovered."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.merging import ExpertLayerWeights, align_experts, weight_matching_permutation
from moekit.merging.align import permute_experts


def _layer(kind: str, E: int, D: int, F: int, seed: int) -> tuple[moekit.ExpertBank, ExpertLayerWeights]:
    torch.manual_seed(seed)
    bank = moekit.MLPExperts(E, D, F, activation="gelu") if kind == "mlp" else moekit.GLUExperts(E, D, F)
    params = {n: p.detach() for n, p in bank.stacked_parameters().items()}
    return bank, ExpertLayerWeights(kind, params, torch.randn(E, D), None, bank.activation)


def _outputs(bank: moekit.ExpertBank, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for name, p in params.items():
            getattr(bank, name).copy_(p)
        return torch.stack([bank.expert_forward(x, e) for e in range(bank.num_experts)])


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["mlp", "glu"]),
    E=st.integers(2, 5),
    F=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    anchor=st.integers(0, 4),
)
def test_alignment_preserves_every_expert_function(kind: str, E: int, F: int, seed: int, anchor: int) -> None:
    bank, w = _layer(kind, E, 6, F, seed)
    x = torch.randn(11, 6)
    before = _outputs(bank, w.params, x)
    aligned = align_experts(w, anchor % E)
    torch.testing.assert_close(_outputs(bank, aligned.params, x), before, rtol=1e-5, atol=1e-6)
    per_expert_anchor = torch.randint(0, E, (E,))
    aligned = align_experts(w, per_expert_anchor)
    torch.testing.assert_close(_outputs(bank, aligned.params, x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_weight_matching_recovers_a_hidden_permutation(kind: str) -> None:
    _, w = _layer(kind, 2, 8, 16, 0)
    params = {n: p.clone() for n, p in w.params.items()}
    for n in params:
        params[n][1] = params[n][0]  # expert 1 = expert 0 ...
    shuffle = torch.randperm(16)
    params = permute_experts(kind, params, {1: shuffle})  # ... with shuffled hidden units
    assert not torch.equal(params["down_proj"][1], params["down_proj"][0])
    perm = weight_matching_permutation(kind, params, 0, 1)
    aligned = permute_experts(kind, params, {1: perm})
    for n in params:
        torch.testing.assert_close(aligned[n][1], aligned[n][0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_alignment_moves_experts_closer_to_the_anchor(kind: str) -> None:
    _, w = _layer(kind, 4, 8, 32, 1)
    aligned = align_experts(w, 0)

    def dist(p: dict[str, torch.Tensor], e: int) -> float:
        return sum(float((p[n][e] - p[n][0]).pow(2).sum()) for n in p)

    for e in range(1, 4):
        assert dist(aligned.params, e) <= dist(w.params, e) + 1e-6
    for n in w.params:
        assert torch.equal(aligned.params[n][0], w.params[n][0])  # the anchor itself is untouched


def test_alignment_rejects_bad_anchors() -> None:
    _, w = _layer("glu", 3, 4, 4, 0)
    with pytest.raises(ValueError, match="anchor must be <= 2, got 3"):
        align_experts(w, 3)
    with pytest.raises(ValueError, match="anchors_E must be"):
        align_experts(w, torch.tensor([0, 1]))
