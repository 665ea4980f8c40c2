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
from .cpu_grouped import RowSplit, run_split, split_groups

__all__ = ["grouped_linear", "grouped_linear_reference", "grouped_mm_available"]

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether the fused kernel can serve these operands (device, dtype and alignment)."""
    if not _HAS_GROUPED_MM or x.dtype != w.dtype or x.device != w.device:
        return False
    per_16_bytes = 16 // x.element_size()
    if w.shape[-1] % per_16_bytes or w.shape[-2] % per_16_bytes:  # kernel needs 16-byte aligned strides
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return False


class _GroupedMM(torch.autograd.Function):
    """y[rows of g] = x[rows of g] @ w[g].T, with ``w`` of shape [G, O, I].

    ``split`` (or None: ``F.grouped_mm``) runs each product as one task per run of whole groups.
    """

    @staticmethod
    def forward(ctx, x_NI: Tensor, w_GOI: Tensor, offs_G: Tensor, split: RowSplit | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_NI, w_GOI, offs_G)
        ctx.split = split
        if split is None:
            return F.grouped_mm(x_NI, w_GOI.transpose(-2, -1), offs=offs_G)
        y_NO = x_NI.new_empty(x_NI.shape[0], w_GOI.shape[1])
        run_split(split, lambda g, r: torch.mm(x_NI[r], w_GOI[g].t(), out=y_NO[r]))
        return y_NO

    @staticmethod
    def backward(ctx, grad_NO: Tensor):  # type: ignore[override]
        x_NI, w_GOI, offs_G = ctx.saved_tensors
        split: RowSplit | None = ctx.split
        grad_NO = grad_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if split is None:
                grad_x = F.grouped_mm(grad_NO, w_GOI.contiguous(), offs=offs_G)
            else:
                grad_x = x_NI.new_empty(x_NI.shape)
                run_split(split, lambda g, r: torch.mm(grad_NO[r], w_GOI[g], out=grad_x[r]))
        if ctx.needs_input_grad[1]:
            # [O, N] x [N, I] grouped along N -> [G, O, I]; empty groups give zeros.
            if split is None:
                grad_w = F.grouped_mm(grad_NO.t(), x_NI, offs=offs_G)
            else:
                grad_w = w_GOI.new_empty(w_GOI.shape)  # an empty group's product writes zeros
                run_split(split, lambda g, r: torch.mm(grad_NO[r].t(), x_NI[r], out=grad_w[g]))
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


def grouped_linear_reference(x_NI: Tensor, w_GOI: Tensor, sizes_G: Tensor, bias_GO: Tensor | None = None) -> Tensor:
    """Naive oracle: one ``F.linear`` per row."""
    group_of_row = torch.repeat_interleave(torch.arange(w_GOI.shape[0], device=x_NI.device), sizes_G)
    rows = [
        F.linear(x_NI[i], w_GOI[g], None if bias_GO is None else bias_GO[g]) for i, g in enumerate(group_of_row.tolist())
    ]
    return torch.stack(rows) if rows else _no_rows(x_NI, w_GOI)
