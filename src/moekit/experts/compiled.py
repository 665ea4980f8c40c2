"""The grouped matmul as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` the grouped matmul must not branch on data or read tensor values on the host
(``.tolist()`` of the group sizes), and the compiled ``F.grouped_mm`` accepts fewer dtypes than the eager
one (bf16 only on CPU). ``moekit::grouped_mm`` wraps moekit's eager kernels (``F.grouped_mm`` or the
CPU thread split of ``cpu_grouped``) in an op whose output shape follows from its input shapes, so a
compiled graph holds it as one opaque call in every dtype, with its backward (``moekit::grouped_mm`` on
the transposed weights for the input gradient, ``moekit::grouped_mm_weight_grad`` for the weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_mm_op", "grouped_mm_weight_grad_op"]


def _split(offs_G: Tensor, w_GOI: Tensor):
    from .cpu_grouped import split_groups

    return split_groups(offs_G, w_GOI, None) if offs_G.device.type == "cpu" else None


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def grouped_mm_op(x_NI: Tensor, w_GOI: Tensor, offs_G: Tensor, transpose: bool = False) -> Tensor:
    """``x[rows of g] @ w[g].T`` (``transpose``: ``@ w[g]``), rows of group g ending at ``offs_G[g]``:
    ``[N, I] -> [N, O]``."""
    from .grouped import grouped_rows

    if x_NI.shape[0] == 0:
        return x_NI.new_zeros(0, w_GOI.shape[2 if transpose else 1])
    return grouped_rows(x_NI, w_GOI, offs_G, _split(offs_G, w_GOI), transpose)


@grouped_mm_op.register_fake
def _(x_NI: Tensor, w_GOI: Tensor, offs_G: Tensor, transpose: bool = False) -> Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_GOI.shape[2 if transpose else 1])


@torch.library.custom_op("moekit::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad_op(grad_NO: Tensor, x_NI: Tensor, offs_G: Tensor, groups: int) -> Tensor:
    """``grad[rows of g].T @ x[rows of g]`` for each of ``groups`` groups: ``[G, O, I]``."""
    from .grouped import grouped_weight_grad

    if x_NI.shape[0] == 0:
        return x_NI.new_zeros(groups, grad_NO.shape[1], x_NI.shape[1])
    w_shape = torch.empty(groups, grad_NO.shape[1], x_NI.shape[1], device="meta")
    return grouped_weight_grad(grad_NO, x_NI, offs_G, _split(offs_G, w_shape), groups)


@grouped_mm_weight_grad_op.register_fake
def _(grad_NO: Tensor, x_NI: Tensor, offs_G: Tensor, groups: int) -> Tensor:
    return x_NI.new_empty(groups, grad_NO.shape[1], x_NI.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_NI, w_GOI, offs_G, transpose = inputs
    ctx.save_for_backward(x_NI, w_GOI, offs_G)
    ctx.transpose = transpose


def _backward(ctx, grad_NO: Tensor):
    x_NI, w_GOI, offs_G = ctx.saved_tensors
    grad_NO = grad_NO.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm_op(grad_NO, w_GOI, offs_G, not ctx.transpose)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_mm_weight_grad_op(grad_NO, x_NI, offs_G, w_GOI.shape[0])
        if ctx.transpose:  # w was used as [G, I, O]
            grad_w = grad_w.transpose(1, 2)
    return grad_x, grad_w, None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
