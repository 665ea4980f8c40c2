"""SMEAR's native merged products (``native_gemv.merged_*``, the fp32 CPU path of ``merged_linear``) against a
float64 reference, in outputs and in every gradient, and the routing between them and the torch path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.experts import native_gemv
from moekit.experts.merged_linear import merged_linear, merged_linear_reference
from moekit.layers.smear import SMEAR
from moekit.routers.smear import SMEARRouter

needs_native = pytest.mark.skipif(not native_gemv.merged_available(), reason="no AVX-512 native kernel here")


def _case(G: int, S: int, I: int, O: int, E: int, bias: bool, seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, S, I, generator=g)
    probs = torch.randn(G, E, generator=g).softmax(-1)
    w = torch.randn(E, O, I, generator=g) / I**0.5
    b = torch.randn(E, O, generator=g) if bias else None
    return [x, probs, w, b]


def _float64_results(x, probs, w, b, grad_y) -> list[torch.Tensor]:
    """``[y, grad_x, grad_probs, grad_w(, grad_b)]`` of the plain reference in float64."""
    exact = [None if t is None else t.double().requires_grad_() for t in (x, probs, w, b)]
    y = merged_linear_reference(*exact)
    inputs = [t for t in exact if t is not None]
    return [y.detach(), *torch.autograd.grad(y, inputs, grad_y.double())]


def _assert_close_to(results: list[torch.Tensor], references: list[torch.Tensor], rtol: float = 2e-5) -> None:
    """Each result within ``rtol`` of its float64 reference, relative to the reference's largest value."""
    for a, r in zip(results, references, strict=True):
        scale = float(r.abs().max()) or 1.0
        assert float((a.double() - r).abs().max()) <= rtol * scale, (a.shape, float((a.double() - r).abs().max()), scale)


SHAPES = [  # G, S, I, O, E: tiles of every width, lane tails, more experts than one register pass, one row
    (2, 128, 512, 96, 8), (3, 5, 17, 30, 3), (2, 1, 8, 7, 1), (4, 9, 100, 50, 9), (5, 70, 33, 65, 17), (1, 200, 64, 64, 2),
    (2, 64, 300, 25, 8), (3, 16, 1, 1, 2), (2, 130, 48, 40, 16), (7, 3, 257, 129, 4), (1, 65, 80, 200, 5),
]


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("G, S, I, O, E", SHAPES)
def test_native_products_match_float64_reference(G, S, I, O, E, bias, threads) -> None:
    x, probs, w, b = _case(G, S, I, O, E, bias)
    grad_y = torch.randn(G, S, O)
    y = native_gemv.merged_forward(x, probs, w, b, threads=threads)
    grad_x = native_gemv.merged_grad_input(grad_y, probs, w, threads=threads)
    grad_w, grad_p = native_gemv.merged_grad_weights(x, grad_y, probs, w, threads=threads)
    references = _float64_results(x, probs, w, b, grad_y)
    if bias:  # the bias's share of grad probs is added by merged_linear, not by the kernel
        references[2] = references[2] - grad_y.double().sum(1) @ b.double().T
    _assert_close_to([y, grad_x, grad_p, grad_w], references[:4])


@needs_native
@settings(max_examples=40, deadline=None)
@given(G=st.integers(1, 6), S=st.integers(1, 140), I=st.integers(1, 150), O=st.integers(1, 150), E=st.integers(1, 12),
       bias=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 1000))  # fmt: skip
def test_merged_linear_native_path_at_random_sizes(G, S, I, O, E, bias, threads, seed) -> None:
    """Through ``merged_linear`` (autograd, the bias's gradients included) at any size."""
    values = _case(G, S, I, O, E, bias, seed)
    inputs = [t.requires_grad_() for t in values if t is not None]
    grad_y = torch.randn(G, S, O, generator=torch.Generator().manual_seed(seed))
    torch.set_num_threads(threads)
    try:
        y = merged_linear(*values)
        results = [y.detach(), *torch.autograd.grad(y, inputs, grad_y)]
    finally:
        torch.set_num_threads(1)
    _assert_close_to(results, _float64_results(*values, grad_y))


@needs_native
def test_group_blocks_past_the_merge_budget() -> None:
    """More groups than one merged block holds (64 columns x K values each, 8 MiB): several group blocks."""
    G, S, I, O, E = 40, 2, 1024, 70, 3
    x, probs, w, b = _case(G, S, I, O, E, True)
    assert G * I * 64 * 4 > 8 * 2**20
    grad_y = torch.randn(G, S, O)
    results = [native_gemv.merged_forward(x, probs, w, b), native_gemv.merged_grad_input(grad_y, probs, w)]
    references = _float64_results(x, probs, w, b, grad_y)
    _assert_close_to(results, references[:2])
    # grad x's inner dimension is O here; with w's roles swapped ([E, I, O], 1024 rows) its merged blocks also
    # span several group blocks
    w_T = w.transpose(1, 2).contiguous()
    grad_T = torch.randn(G, S, I)
    expected = torch.einsum("gsi,gio->gso", grad_T.double(), torch.einsum("ge,eio->gio", probs.double(), w_T.double()))
    _assert_close_to([native_gemv.merged_grad_input(grad_T, probs, w_T)], [expected])


@needs_native
@pytest.mark.parametrize("want_w, want_probs", [(True, False), (False, True)])
def test_grad_weights_computes_only_what_is_asked(want_w, want_probs) -> None:
    x, probs, w, _ = _case(3, 20, 40, 30, 4, False)
    grad_y = torch.randn(3, 20, 30)
    grad_w, grad_p = native_gemv.merged_grad_weights(x, grad_y, probs, w, want_w=want_w, want_probs=want_probs)
    full_w, full_p = native_gemv.merged_grad_weights(x, grad_y, probs, w)
    assert (grad_w is None) != want_w and (grad_p is None) != want_probs
    torch.testing.assert_close(grad_w if want_w else grad_p, full_w if want_w else full_p)


def _calls(monkeypatch) -> list[str]:
    seen: list[str] = []
    for name in ("merged_forward", "merged_grad_input", "merged_grad_weights"):
        real = getattr(native_gemv, name)
        monkeypatch.setattr(native_gemv, name, lambda *a, _real=real, _name=name, **k: seen.append(_name) or _real(*a, **k))
    return seen


@needs_native
@pytest.mark.parametrize("bank", ["adapter", "mlp", "glu"])
def test_smear_layer_runs_the_native_products_with_the_torch_paths_result(bank, monkeypatch) -> None:
    """A fp32 SMEAR layer's merged linear maps take the native products; switched off they take the chunked
    torch path; outputs and gradients agree."""
    torch.manual_seed(0)
    experts = {"adapter": lambda: moekit.AdapterExperts(4, 24, 8), "mlp": lambda: moekit.MLPExperts(4, 24, 40),
               "glu": lambda: moekit.GLUExperts(4, 24, 40)}[bank]()  # fmt: skip
    layer = SMEAR(experts, SMEARRouter(24, 4, init_std=1.0, expert_dropout=0.0), merge_chunk_bytes=1)  # the fused path
    x = torch.randn(5, 7, 24, requires_grad=True)
    params = [x, *layer.parameters()]
    seen = _calls(monkeypatch)
    y = layer(x).y
    native = [y, *torch.autograd.grad(y.square().sum(), params)]
    assert {"merged_forward", "merged_grad_input", "merged_grad_weights"} <= set(seen)
    monkeypatch.setattr(native_gemv, "merged_available", lambda: False)
    seen.clear()
    y = layer(x).y
    plain = [y, *torch.autograd.grad(y.square().sum(), params)]
    assert not seen
    for a, r in zip(native, plain, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@needs_native
def test_backward_reads_a_strided_output_gradient() -> None:
    x, probs, w, b = [None if t is None else t.requires_grad_() for t in _case(3, 9, 20, 12, 4, True)]
    g = torch.randn(9, 12, 3).permute(2, 0, 1)  # not contiguous
    y = merged_linear(x, probs, w, b)
    results = [y.detach(), *torch.autograd.grad(y, [x, probs, w, b], g)]
    _assert_close_to(results, _float64_results(x.detach(), probs.detach(), w.detach(), b.detach(), g))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merged_linear_keeps_the_torch_path_off_fp32_cpu(dtype, monkeypatch) -> None:
    """float64 and bf16 (and CUDA) operands never reach the native products, and keep the torch path's result."""
    seen = _calls(monkeypatch)
    x, probs, w, b = [t.to(dtype).requires_grad_() for t in _case(2, 3, 4, 5, 3, True)]
    y = merged_linear(x, probs, w, b)
    y.sum().backward()
    assert not seen
    torch.testing.assert_close(y, merged_linear_reference(x, probs, w, b))


@needs_native
def test_native_products_reject_bad_arguments() -> None:
    x, probs, w, b = _case(2, 3, 4, 5, 3, True)
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        native_gemv.merged_forward(x.double(), probs, w)
    with pytest.raises(ValueError, match=r"probs .*disagree"):
        native_gemv.merged_forward(x, probs[:1], w)
    with pytest.raises(ValueError, match=r"b must be \[E, O\]"):
        native_gemv.merged_forward(x, probs, w, b[:, :2])
    with pytest.raises(ValueError, match=r"grad .*disagree"):
        native_gemv.merged_grad_input(torch.randn(2, 3, 4), probs, w)
    with pytest.raises(ValueError, match=r"grad must be \[G, S, O\]"):
        native_gemv.merged_grad_weights(x, torch.randn(2, 3, 4), probs, w)


def test_switched_off_the_merged_products_are_unavailable(monkeypatch) -> None:
    monkeypatch.setenv("MOEKIT_NATIVE_GEMV", "0")
    assert not native_gemv.merged_available()
    x, probs, w, _ = _case(2, 3, 4, 5, 3, False)
    with pytest.raises(RuntimeError, match="not available"):
        native_gemv.merged_forward(x, probs, w)
    torch.testing.assert_close(merged_linear(x, probs, w), merged_linear_reference(x, probs, w))
