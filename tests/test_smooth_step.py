"""Smooth-step: exact values, derivatives at the band edges, gamma checks; exactly sparse decisions."""

import pytest
import torch

import moekit
from moekit.experts.dispatch import combine_dense, dispatch
from moekit.routers.smooth_step import check_gamma, smooth_step, sparse_decision


@pytest.mark.parametrize("gamma", [0.01, 1.0, 7.5])
def test_values_at_and_beyond_band_edges_are_exact(gamma: float) -> None:
    h = gamma / 2
    t = torch.tensor([-10 * gamma, -h, 0.0, h, 10 * gamma], dtype=torch.float64)
    assert smooth_step(t, gamma).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("gamma", [0.1, 1.0, 4.0])
def test_derivative_is_zero_at_edges_and_matches_the_cubic_inside(gamma: float) -> None:
    h = gamma / 2
    t = torch.tensor([-2 * h, -h, -0.5 * h, 0.0, 0.3 * h, h, 3 * h], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(t, gamma).sum(), t)
    expected = torch.where(t.abs() < h, -6 * t.detach() ** 2 / gamma**3 + 1.5 / gamma, torch.zeros_like(t))
    torch.testing.assert_close(grad, expected)
    assert grad[1] == 0 and grad[5] == 0  # exactly at the edges
    assert grad[3] == pytest.approx(1.5 / gamma)


def test_continuous_and_monotone_across_the_band() -> None:
    gamma = 2.0
    t = torch.linspace(-1.5, 1.5, 3001, dtype=torch.float64)
    s = smooth_step(t, gamma)
    assert (s.diff() >= 0).all()
    eps = 1e-6
    near = smooth_step(torch.tensor([-1 + eps, 1 - eps], dtype=torch.float64), gamma)
    torch.testing.assert_close(near, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.autograd.gradcheck(
        lambda x: smooth_step(x, gamma), torch.linspace(-0.9, 0.9, 7, dtype=torch.float64, requires_grad=True)
    )


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_gamma_is_rejected_with_its_value(bad: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        check_gamma(bad)
    with pytest.raises(TypeError, match="gamma"):
        check_gamma("1")


def test_sparse_decision_holds_exactly_the_non_zeros() -> None:
    gates = torch.tensor([[0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    d = sparse_decision(gates[:2], 2)
    assert d.k == 2
    assert d.kept_TK.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(d.gates_TE(), gates[:2])
    wide = sparse_decision(gates, 2)
    assert wide.k == 4  # one token still uses four experts: all of them are kept
    torch.testing.assert_close(wide.gates_TE(), gates)
    assert int(wide.kept_mask().sum()) == 2 + 1 + 4


def test_sparse_decision_dispatch_equals_dense_mix_outputs_and_gradients() -> None:
    experts = moekit.MLPExperts(5, 6, 12)
    logits = torch.randn(9, 5, requires_grad=True)
    x = torch.randn(9, 6, requires_grad=True)
    mask = torch.rand(9, 5) < 0.5
    mask[:, 0] = True
    gates = torch.softmax(logits, -1) * mask
    y_sparse = dispatch(experts, x, sparse_decision(gates, 2))
    y_dense = combine_dense(experts, x, gates)
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-5, atol=1e-6)
    g_sparse = torch.autograd.grad(y_sparse.square().sum(), [logits, x, experts.up_proj], retain_graph=True)
    g_dense = torch.autograd.grad(y_dense.square().sum(), [logits, x, experts.up_proj])
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
