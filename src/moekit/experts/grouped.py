"""Grouped linear map: rows of ``x`` split into consecutive groups, each with its own weight.

This is the one kernel that sparse dispatch (groups = experts), SMEAR (groups = examples with
merged weights) and dense ensembles (groups = experts over repeated tokens) all run on.

Fast path: ``torch.nn.functional.grouped_mm`` wrapped in an autograd function (its built-in
backward rejects the expanded/strided gradients autograd often hands over). Fallback: a plain loop
over groups with ``torch.mm``. ``grouped_linear_reference`` is the naive oracle for tests.

Large products on CPU (``cpu_grouped.py``): with several intra-op threads the groups are split over
threads (each a contiguous run of groups with about the same number of rows, one intra-op thread
each) instead of each small GEMM over all threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int
from .compiled import grouped_mm_op
from .cpu_grouped import RowSplit, run_split, split_groups

__all__ = ["grouped_linear", "grouped_linear_reference", "grouped_mm_available"]

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether the fused kernel can serve these operands (device, dtype and alignment)."""
    if x.dtype != w.dtype or x.device != w.device:
        return False
    return _kernel_serves(x, w.shape[-2], w.shape[-1])


def _kernel_serves(x: Tensor, *widths: int) -> bool:
    """Whether ``F.grouped_mm`` takes ``x``'s dtype and device with operands of these widths."""
    if not _HAS_GROUPED_MM:
        return False
    per_16_bytes = 16 // x.element_size()
    if any(n % per_16_bytes for n in widths):  # kernel needs 16-byte aligned strides
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return False


def grouped_rows(x_NI: Tensor, w_GOI: Tensor, offs_G: Tensor, split: RowSplit | None, transpose: bool = False) -> Tensor:
    """``x[rows of g] @ w[g].T`` (``transpose``: ``@ w[g]``) for every group: ``[N, I] -> [N, O]``.
    ``split`` runs the products one pool task per run of whole groups; None: one ``F.grouped_mm``
    (a loop of ``torch.mm`` where that kernel cannot serve the operands)."""
    if split is None and not grouped_mm_available(x_NI, w_GOI):
        split = _serial(offs_G)
    if split is None:
        return F.grouped_mm(x_NI, w_GOI.contiguous() if transpose else w_GOI.transpose(-2, -1), offs=offs_G)
    y_NO = x_NI.new_empty(x_NI.shape[0], w_GOI.shape[2 if transpose else 1])
    run_split(split, lambda g, r: torch.mm(x_NI[r], w_GOI[g] if transpose else w_GOI[g].t(), out=y_NO[r]))
    return y_NO


def grouped_weight_grad(grad_NO: Tensor, x_NI: Tensor, offs_G: Tensor, split: RowSplit | None, groups: int) -> Tensor:
    """``grad[rows of g].T @ x[rows of g]`` for every group: ``[G, O, I]`` (an empty group gives zeros)."""
    if split is None and not _kernel_serves(x_NI, grad_NO.shape[1], x_NI.shape[1]):
        split = _serial(offs_G)
    if split is None:
        return F.grouped_mm(grad_NO.t(), x_NI, offs=offs_G)
    grad_w = x_NI.new_empty(groups, grad_NO.shape[1], x_NI.shape[1])  # an empty group's product writes zeros
    run_split(split, lambda g, r: torch.mm(grad_NO[r].t(), x_NI[r], out=grad_w[g]))
    return grad_w


def _serial(offs_G: Tensor) -> RowSplit:
    """Every group in one run (``run_split`` then loops in the calling thread)."""
    ends = offs_G.tolist()
    return RowSplit(((0, len(ends)),), (0, *ends))


class _GroupedMM(torch.autograd.Function):
    """y[rows of g] = x[rows of g] @ w[g].T, with ``w`` of shape [G, O, I].

    ``split`` (or None: ``F.grouped_mm``) runs each product as one task per run of whole groups.
    """

    @staticmethod
    def forward(ctx, x_NI: Tensor, w_GOI: Tensor, offs_G: Tensor, split: RowSplit | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_NI, w_GOI, offs_G)
        ctx.split = split
        return grouped_rows(x_NI, w_GOI, offs_G, split)

    @staticmethod
    def backward(ctx, grad_NO: Tensor):  # type: ignore[override]
        x_NI, w_GOI, offs_G = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = grouped_rows(grad_NO, w_GOI, offs_G, ctx.split, transpose=True) if ctx.needs_input_grad[0] else None
        grad_w = grouped_weight_grad(grad_NO, x_NI, offs_G, ctx.split, w_GOI.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


def _loop(x_NI: Tensor, w_GOI: Tensor, sizes: list[int]) -> Tensor:
    pieces = [chunk @ w_GOI[g].t() for g, chunk in enumerate(torch.split(x_NI, sizes)) if sizes[g] > 0]
    if not pieces:
        return _no_rows(x_NI, w_GOI)
    return torch.cat(pieces)


def _no_rows(x_NI: Tensor, w_GOI: Tensor) -> Tensor:
    """``[0, O]`` output that stays in the autograd graph (zero grads) when no row is routed."""
    return x_NI @ w_GOI[0].t() if w_GOI.shape[0] else x_NI.new_zeros(0, w_GOI.shape[1])


def grouped_linear(
    x_NI: Tensor,
    w_GOI: Tensor,
    sizes_G: Tensor,
    bias_GO: Tensor | None = None,
    *,
    fast: bool | None = None,
    threads: int | None = None,
) -> Tensor:
    """Apply ``w[g]`` (``[O, I]``, nn.Linear layout) to the ``sizes_G[g]`` consecutive rows of group g.

    Args:
        x_NI: ``[N, I]`` rows sorted by group; ``N == sizes_G.sum()``.
        w_GOI: ``[G, O, I]`` per-group weights.
        sizes_G: ``[G]`` int rows per group (may contain zeros).
        bias_GO: optional ``[G, O]`` per-group bias.
        fast: force (True) or forbid (False) the fused kernel; ``None`` uses one ``torch.bmm`` when all
            groups have the same size, else picks by device and dtype.
        threads: on the fused CPU path, how many threads to split the groups over (1: none, the
            kernel's own intra-op threads); ``None`` uses ``torch.get_num_threads()`` when the
            product is large enough to pay for it (see ``cpu_grouped.split_groups``).
    Returns:
        ``[N, O]``.
    """
    if threads is not None:
        check_int("threads", threads, low=1)
    use_fast = grouped_mm_available(x_NI, w_GOI) if fast is None else fast
    G, N = w_GOI.shape[0], x_NI.shape[0]
    if torch.compiler.is_compiling():  # no data-dependent branch or host sync in a traced graph
        return _traced_grouped_linear(x_NI, w_GOI, sizes_G, bias_GO)
    if fast is None and 0 < G and 0 < N and N % G == 0 and bool((sizes_G == N // G).all()):
        # groups of equal size (SMEAR's examples, dense ensembles): one batched matmul, in the operand
        # order whose backward copies less: W @ x^T keeps the weight gradient contiguous (pays off when a
        # group has more weights than activations, e.g. SMEAR's merged FFN weights per example).
        S, O, I = N // G, w_GOI.shape[1], w_GOI.shape[2]
        x_GSI = x_NI.reshape(G, S, I)
        if S * (I + O) < O * I:
            xT = x_GSI.transpose(1, 2)
            y = torch.bmm(w_GOI, xT) if bias_GO is None else torch.baddbmm(bias_GO.unsqueeze(2), w_GOI, xT)
            return y.transpose(1, 2).reshape(N, O)
        w_GIO = w_GOI.transpose(1, 2)
        y = torch.bmm(x_GSI, w_GIO) if bias_GO is None else torch.baddbmm(bias_GO.unsqueeze(1), x_GSI, w_GIO)
        return y.reshape(N, O)
    if use_fast and x_NI.shape[0] > 0:
        offs = torch.cumsum(sizes_G, 0).to(torch.int32)
        split = split_groups(offs, w_GOI, threads) if x_NI.device.type == "cpu" else None
        y = _GroupedMM.apply(x_NI.contiguous(), w_GOI, offs, split)
    else:
        y = _loop(x_NI, w_GOI, sizes_G.tolist())
    if bias_GO is not None:
        y = y + torch.repeat_interleave(bias_GO, sizes_G, dim=0, output_size=x_NI.shape[0])
    return y


def _traced_grouped_linear(x_NI: Tensor, w_GOI: Tensor, sizes_G: Tensor, bias_GO: Tensor | None) -> Tensor:
    """``grouped_linear`` under ``torch.compile``: ``F.grouped_mm`` where the compiled kernel accepts the
    operands (its CPU version takes bf16 only, ``compiled_grouped_mm_accepts``), else moekit's custom op
    (``moekit::grouped_mm``, the eager kernels behind an opaque op): one graph, no break, any dtype."""
    offs = torch.cumsum(sizes_G, 0).to(torch.int32)
    x = x_NI.contiguous()
    if compiled_grouped_mm_accepts(x, w_GOI):
        y = _GroupedMM.apply(x, w_GOI, offs, None)
    else:
        y = grouped_mm_op(x, w_GOI, offs)
    if bias_GO is not None:
        y = y + torch.repeat_interleave(bias_GO, sizes_G, dim=0, output_size=x_NI.shape[0])
    return y


def compiled_grouped_mm_accepts(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch.compile`` takes ``F.grouped_mm`` for these operands: its CPU meta kernel accepts
    bf16 only (eager accepts fp32 too), CUDA bf16 on sm80+."""
    return grouped_mm_available(x, w) and x.dtype == torch.bfloat16


def grouped_linear_reference(x_NI: Tensor, w_GOI: Tensor, sizes_G: Tensor, bias_GO: Tensor | None = None) -> Tensor:
    """Naive oracle: one ``F.linear`` per row."""
    group_of_row = torch.repeat_interleave(torch.arange(w_GOI.shape[0], device=x_NI.device), sizes_G)
    rows = [
        F.linear(x_NI[i], w_GOI[g], None if bias_GO is None else bias_GO[g]) for i, g in enumerate(group_of_row.tolist())
    ]
    return torch.stack(rows) if rows else _no_rows(x_NI, w_GOI)
