"""The grouped linear kernel and the fused SwiGLU: fast paths against naive references, outputs and grads."""

import pytest
import torch
import torch.nn.functional as F

from moekit.experts import cpu_grouped
from moekit.experts.grouped import grouped_linear, grouped_linear_reference, grouped_mm_available
from moekit.experts.mlp import swiglu

SIZES = [[3, 0, 5], [0, 0, 4], [8], [0], [0, 7, 0, 1], [2, 2, 2, 2], [0, 0, 0]]


def grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    got = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, got)]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("path", ["fast", "loop"])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_matches_reference(sizes: list[int], path: str, bias: bool) -> None:
    s = torch.tensor(sizes)
    x = torch.randn(int(s.sum()), 8, requires_grad=True)
    w = torch.randn(len(sizes), 12, 8, requires_grad=True)
    b = torch.randn(len(sizes), 12, requires_grad=True) if bias else None
    y = grouped_linear(x, w, s, b, fast=path == "fast")
    ref = grouped_linear_reference(x, w, s, b)
    assert y.shape == ref.shape == (x.shape[0], 12)
    torch.testing.assert_close(y, ref)
    inputs = [x, w] + ([b] if bias else [])
    g = torch.randn_like(ref)
    for name, a, r in zip(["x", "w", "b"], grads(y, inputs, g), grads(ref, inputs, g)):
        torch.testing.assert_close(a, r, msg=lambda m: f"grad of {name}: {m}")


def test_empty_groups_get_zero_weight_grads() -> None:
    s = torch.tensor([0, 5, 0])
    x = torch.randn(5, 8)
    w = torch.randn(3, 4, 8, requires_grad=True)
    grouped_linear(x, w, s, fast=True).sum().backward()
    assert w.grad is not None
    assert w.grad[0].abs().sum() == 0 and w.grad[2].abs().sum() == 0 and w.grad[1].abs().sum() > 0


def test_auto_choice_uses_fused_kernel_only_when_aligned() -> None:
    x8, w8 = torch.randn(4, 8), torch.randn(2, 12, 8)
    assert grouped_mm_available(x8, w8) == hasattr(F, "grouped_mm")
    assert not grouped_mm_available(torch.randn(4, 6), torch.randn(2, 12, 6))  # 24-byte rows: unaligned
    assert not grouped_mm_available(x8.double(), w8.double())  # no float64 kernel
    assert not grouped_mm_available(x8, w8.double())
    # unaligned shapes still work through the loop fallback, and match the reference
    x, w, s = torch.randn(5, 6), torch.randn(2, 3, 6), torch.tensor([2, 3])
    torch.testing.assert_close(grouped_linear(x, w, s), grouped_linear_reference(x, w, s))


def test_expanded_and_strided_gradients_are_accepted() -> None:
    """``y.sum().backward()`` hands the kernel an expanded (stride-0) gradient."""
    s = torch.tensor([3, 1])
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(2, 8, 8, requires_grad=True)
    y = grouped_linear(x, w, s, fast=True)
    y.sum().backward()
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_linear_reference(ref_x, ref_w, s).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_bfloat16_fast_path_close_to_float32_reference() -> None:
    s = torch.tensor([5, 0, 11])
    x, w = torch.randn(16, 16), torch.randn(3, 32, 16)
    y = grouped_linear(x.bfloat16(), w.bfloat16(), s)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), grouped_linear_reference(x, w, s), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("shape", [(7, 10), (0, 4), (3, 5, 8)])
def test_swiglu_matches_plain_ops_and_gradcheck(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    y = swiglu(x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(grads(y, [x], g)[0], grads(ref, [x], g)[0])
    assert torch.autograd.gradcheck(swiglu, (x,))


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("sizes", SIZES + [[5, 0, 3, 0, 0, 9, 2]], ids=str)
@pytest.mark.parametrize("threads", [2, 3])
def test_groups_split_over_threads_match_reference(sizes: list[int], threads: int) -> None:
    """The CPU path that gives each thread a run of whole groups: outputs and grads (empty groups,
    one group, uneven sizes; more threads than non-empty groups)."""
    s = torch.tensor(sizes)
    x = torch.randn(int(s.sum()), 8, requires_grad=True)
    w = torch.randn(len(sizes), 12, 8, requires_grad=True)
    if x.shape[0] > 0 and len(sizes) > 1:
        split = cpu_grouped.split_groups(torch.cumsum(s, 0).to(torch.int32), w, threads)
        assert split is not None and len(split.runs) >= 2
    y = grouped_linear(x, w, s, threads=threads)
    ref = grouped_linear_reference(x, w, s)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for name, a, r in zip(["x", "w"], grads(y, [x, w], g), grads(ref, [x, w], g)):
        torch.testing.assert_close(a, r, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_split_runs_cover_groups_with_balanced_rows() -> None:
    sizes = torch.tensor([100, 0, 100, 100, 0, 100])
    split = cpu_grouped.split_groups(torch.cumsum(sizes, 0).to(torch.int32), torch.empty(6, 4, 4), 2)
    assert split is not None and split.runs == ((0, 3), (3, 6))
    assert split.starts == (0, 100, 100, 200, 300, 300, 400)
    # one group, or one intra-op thread: the plain kernel
    assert cpu_grouped.split_groups(torch.tensor([7], dtype=torch.int32), torch.empty(1, 4, 4), 2) is None
    assert cpu_grouped.split_groups(torch.tensor([3, 7], dtype=torch.int32), torch.empty(2, 4, 4), 1) is None


def test_auto_split_only_for_large_products_of_small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """``threads=None``: split with >= 2 intra-op threads when the product is large, the groups small
    and even; the plain kernel otherwise. The split path still matches the reference."""
    monkeypatch.setattr(cpu_grouped, "_intra_op_threads", lambda: 2)

    def offs(sizes: list[int]) -> torch.Tensor:
        return torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)

    w = torch.empty(4, 16, 8)
    assert cpu_grouped.split_groups(offs([6, 6, 6, 6]), w, None) is None  # below MIN_SPLIT_MACS
    monkeypatch.setattr(cpu_grouped, "MIN_SPLIT_MACS", 1)
    assert cpu_grouped.split_groups(offs([6, 6, 6, 6]), w, None) is not None
    assert cpu_grouped.split_groups(offs([20, 1, 1, 2]), w, None) is None  # uneven: one thread would get 20/12
    monkeypatch.setattr(cpu_grouped, "MAX_SPLIT_ROWS", 6)
    assert cpu_grouped.split_groups(offs([6, 6, 6, 6]), w, None) is None  # groups large enough for the kernel
    monkeypatch.setattr(cpu_grouped, "MAX_SPLIT_ROWS", 1024)
    s = torch.tensor([6, 0, 5, 7])
    x, wt = torch.randn(18, 8, requires_grad=True), torch.randn(4, 16, 8, requires_grad=True)
    y, ref = grouped_linear(x, wt, s), grouped_linear_reference(x, wt, s)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for a, r in zip(grads(y, [x, wt], g), grads(ref, [x, wt], g)):
        torch.testing.assert_close(a, r)
    assert torch.get_num_threads() == 1  # the pool's workers did not change the caller's setting


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_threads_rejected(threads) -> None:
    with pytest.raises((ValueError, TypeError), match="threads"):
        grouped_linear(torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([2, 2]), threads=threads)
