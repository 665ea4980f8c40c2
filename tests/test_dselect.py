"""DSelect-k: binary encoding, reference formula, <= k experts once saturated, exact conditional
computation (sparse dispatch == dense mix, outputs and gradients), regularisers, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.routers.dselect import DSelectKRouter, binary_codes


def naive_gates(router: DSelectKRouter, x: torch.Tensor) -> torch.Tensor:
    """Loops over tokens, selectors, experts and bits: q_j = sum_i softmax(alpha)_i prod_t ..."""
    z, alpha = (t.detach() for t in router.selector_logits(x))
    g, h = router.gamma, router.gamma / 2
    S = lambda t: 0.0 if t <= -h else 1.0 if t >= h else -2 * t**3 / g**3 + 1.5 * t / g + 0.5
    out = torch.zeros(x.shape[0], router.num_experts, dtype=torch.float64)
    for n in range(x.shape[0]):
        w = torch.softmax(alpha[n].double(), -1)
        for i in range(router.k):
            for j in range(router.num_experts):
                bits = format(j, f"0{router.num_bits}b") if router.num_bits else ""
                r = 1.0
                for t, bit in enumerate(bits):
                    s = S(float(z[n, i, t]))
                    r *= s if bit == "1" else 1 - s
                out[n, j] += float(w[i]) * r
    return out


def saturate(router: DSelectKRouter, factor: float = 1e4) -> None:
    with torch.no_grad():
        for name, p in router.named_parameters():
            if name.startswith("z_"):
                p.mul_(factor)


def test_binary_codes_msb_first() -> None:
    assert binary_codes(5).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert binary_codes(1).shape == (1, 0)


@pytest.mark.parametrize("conditioning", ["example", "task"])
@pytest.mark.parametrize("n,k", [(8, 2), (6, 3), (1, 1), (5, 1)])
def test_gates_match_the_naive_formula(conditioning: str, n: int, k: int) -> None:
    router = DSelectKRouter(7, n, k, gamma=0.5, conditioning=conditioning)
    with torch.no_grad():
        for p in router.parameters():
            p.mul_(30)  # a mix of saturated and soft selector logits
    x = torch.randn(6, 7)
    d = router(x)
    torch.testing.assert_close(d.gates_TE().double(), naive_gates(router, x), rtol=1e-5, atol=1e-6)
    if n == 2 ** math.ceil(math.log2(n)):
        torch.testing.assert_close(d.gates_TE().sum(-1), torch.ones(6))
        assert "unreachable" not in d.aux
    else:
        assert "unreachable" in d.aux and d.aux["unreachable"] >= k - 1e-4
    if conditioning == "task":
        assert (d.gates_TE() == d.gates_TE()[:1]).all()


def test_published_initialisation_starts_soft() -> None:
    router = DSelectKRouter(10, 8, 2, gamma=2.0)
    assert router.z_proj.weight.abs().max() <= 0.02 and router.w_proj.weight.abs().max() <= 0.05
    d = router(torch.randn(32, 10))
    assert (
        d.k == 8 and not router.is_saturated(torch.randn(32, 10)).any()
    )  # every expert has weight: dense compute, honestly


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 16),
    k_frac=st.floats(0, 1),
    tokens=st.integers(1, 30),
    gamma=st.floats(0.01, 10),
    task=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_at_most_k_experts_once_saturated(n, k_frac, tokens, gamma, task, seed) -> None:
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (n - 1))
    router = DSelectKRouter(6, n, k, gamma=gamma, conditioning="task" if task else "example")
    saturate(router)
    x = torch.randn(tokens, 6)
    sat = router.is_saturated(x)
    d = router(x)
    nonzero = (d.gates_TE() != 0).sum(-1)
    assert (nonzero[sat] <= k).all()
    assert (d.kept_mask().sum(-1)[sat] <= k).all()
    if sat.all():
        assert d.k == k  # the decision itself has only k slots: sparse dispatch runs <= k experts


@pytest.mark.parametrize("conditioning", ["example", "task"])
def test_sparse_dispatch_equals_dense_mix_with_gradients(conditioning: str) -> None:
    router = DSelectKRouter(8, 6, 2, gamma=1.0, conditioning=conditioning)
    with torch.no_grad():
        for p in router.parameters():
            p.mul_(40)  # partly saturated: some exact zeros, some soft weights
    experts = moekit.MLPExperts(6, 8, 16)
    x = torch.randn(20, 8, requires_grad=True)
    sparse = moekit.MoE(router, experts, combine="sparse")
    dense = moekit.MoE(router, experts, combine="dense")
    params = [x, *router.parameters(), experts.up_proj, experts.down_proj]
    y_s = sparse(x).y
    y_d = dense(x).y
    torch.testing.assert_close(y_s, y_d, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(y_s.square().sum(), params), torch.autograd.grad(y_d.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 40.0, 1e4])
def test_gradients_are_finite_with_regularisers(scale: float) -> None:
    router = DSelectKRouter(8, 5, 2, gamma=0.3)
    with torch.no_grad():
        for p in router.parameters():
            p.mul_(scale)
    layer = moekit.MoE(router, moekit.MLPExperts(5, 8, 16))
    x = torch.randn(16, 8, requires_grad=True)
    out = layer(x)
    loss = out.y.square().mean() + out.aux["entropy_reg"] + out.aux["unreachable"]
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in router.parameters() if p.grad is not None)


@pytest.mark.parametrize("conditioning", ["task", "example"])
def test_entropy_regulariser_training_sparsifies_the_gate(conditioning: str) -> None:
    torch.manual_seed(1)
    router = DSelectKRouter(4, 8, 2, gamma=1.0, conditioning=conditioning)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    x = torch.randn(64, 4)
    start = float(router(x).aux["entropy_reg"].detach())
    for _ in range(120):
        loss = router(x).aux["entropy_reg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = router(x)
    assert d.aux["entropy_reg"] < 0.05 * start
    if conditioning == "task":
        assert router.is_saturated(x).all() and d.k == 2
    else:  # a linear split cannot saturate the examples right next to its hyperplane
        assert router.is_saturated(x).float().mean() > 0.4 and d.k < 8


def test_registry_and_k1_baseline() -> None:
    router = moekit.create_router("dselect", dim=8, num_experts=4, k=1)
    assert isinstance(router, DSelectKRouter) and router.is_sparse
    saturate(router)
    assert router(torch.randn(5, 8)).k == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"gamma": 0.0}, ValueError, "gamma must be a finite number > 0, got 0"),
        ({"gamma": -2.0}, ValueError, "gamma"),
        ({"k": 5}, ValueError, "k must be <= num_experts"),
        ({"k": 0}, ValueError, "k must be >= 1, got 0"),
        ({"conditioning": "batch"}, ValueError, "conditioning must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        DSelectKRouter(**{"dim": 4, "num_experts": 4, "k": 2, **kwargs})
