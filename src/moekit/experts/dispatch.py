"""Sparse dispatch: sort token slots by expert, run each expert on its rows, scatter back weighted.

``dispatch`` is the fast path (one grouped call per weight); ``dispatch_reference`` is the plain
per-expert loop that every fast path is tested against (outputs and gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..types import RoutingDecision
from .base import ExpertBank
from .inference import dispatch_inference, inference_applies

__all__ = ["DispatchPlan", "plan_dispatch", "scatter_weighted", "dispatch", "dispatch_reference", "combine_dense"]


@dataclass(frozen=True)
class DispatchPlan:
    """Live slots sorted by expert.

    Attributes:
        token_N: source token of each sorted slot, ``[N]`` (N = kept slots).
        weight_N: combine weight of each sorted slot, ``[N]``.
        sizes_E: slots per expert, ``[E]`` (sums to N).
    """

    token_N: Tensor
    weight_N: Tensor
    sizes_E: Tensor


def plan_dispatch(decision: RoutingDecision) -> DispatchPlan:
    """Flatten ``[T, K]`` slots, drop the ones capacity removed, and sort stably by expert id."""
    T, K = decision.ids_TK.shape
    ids = decision.ids_TK.reshape(-1)
    weights = decision.weights_TK.reshape(-1)
    token = torch.arange(T, device=ids.device).repeat_interleave(K)
    if decision.kept_TK is not None:
        kept = decision.kept_TK.reshape(-1)
        ids, weights, token = ids[kept], weights[kept], token[kept]
    order = torch.argsort(ids, stable=True)
    sizes = torch.bincount(ids, minlength=decision.num_experts)
    return DispatchPlan(token[order], weights[order], sizes)


class _WeightedScatter(torch.autograd.Function):
    """``out[t] = sum_{n: token_N[n] = t} w_N[n] * y_N[n]`` with a hand-written backward.

    Autograd of ``index_add(y_N * w)`` allocates three ``[N, ...]`` temporaries in the backward
    (gathered grad, grad * w, grad * y before the row sums); this one gathers the grad once, takes
    the weight grads as batched dot products and scales the gathered grad in place.
    """

    @staticmethod
    def forward(ctx, y_N: Tensor, w_N: Tensor, token_N: Tensor, num_tokens: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y_N, w_N, token_N)
        out = y_N.new_zeros(num_tokens, *y_N.shape[1:])
        return out.index_add_(0, token_N, y_N * _rows(w_N, y_N))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_T: Tensor):  # type: ignore[override]
        y_N, w_N, token_N = ctx.saved_tensors
        g_N = grad_T.index_select(0, token_N)
        grad_w = None
        if ctx.needs_input_grad[1]:
            N, width = y_N.shape[0], math.prod(y_N.shape[1:])
            grad_w = torch.bmm(g_N.reshape(N, 1, width), y_N.reshape(N, width, 1)).reshape(N).to(w_N.dtype)
        grad_y = g_N.mul_(_rows(w_N, g_N)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None


def _rows(w_N: Tensor, like: Tensor) -> Tensor:
    """Per-row weights shaped to broadcast over the trailing dims of ``like``."""
    return w_N.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def scatter_weighted(y_N: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted sum of the sorted expert outputs back onto their tokens: ``[N, ...] -> [T, ...]``."""
    return _WeightedScatter.apply(y_N, plan.weight_N, plan.token_N, num_tokens)


def dispatch(experts: ExpertBank, x_T: Tensor, decision: RoutingDecision) -> Tensor:
    """Sparse MoE combine ``y_t = sum_k w_tk * expert_{id_tk}(x_t)`` over kept slots.

    Args:
        experts: the bank.
        x_T: ``[T, D]`` tokens (or ``[T, C, H, W]`` images for conv banks).
        decision: routing for the T tokens.
    Returns:
        ``[T, out_dim]`` (or images); tokens with no kept slot get zeros.

    When no gradient can be asked for (``no_grad``, ``inference_mode``, or nothing requires grad) and the
    bank has ``expert_inference``, this runs the forward-only path of ``inference.py`` (same outputs).
    """
    if inference_applies(experts, x_T, decision):
        return dispatch_inference(experts, x_T, decision)
    plan = plan_dispatch(decision)
    x_N = x_T.index_select(0, plan.token_N)  # backward: one index_add, not index_put(accumulate)
    y_N = experts.grouped_forward(x_N, experts.stacked_parameters(), plan.sizes_E)
    return scatter_weighted(y_N, plan, x_T.shape[0])


def dispatch_reference(experts: ExpertBank, x_T: Tensor, decision: RoutingDecision) -> Tensor:
    """Naive oracle: for each expert, gather its tokens, run it with plain ops, add weighted."""
    weights = decision.effective_weights()
    y = None
    for e in range(experts.num_experts):
        token, slot = torch.nonzero((decision.ids_TK == e) & decision.kept_mask(), as_tuple=True)
        out = experts.expert_forward(x_T[token], e)
        if y is None:
            y = out.new_zeros(x_T.shape[0], *out.shape[1:])
        w = weights[token, slot].to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
        y = y.index_add(0, token, out * w)
    assert y is not None
    return y


def combine_dense(experts: ExpertBank, x_T: Tensor, gates_TE: Tensor) -> Tensor:
    """Run every expert on every token and mix outputs with dense gates ``[T, E]`` (ensembles)."""
    y_TE = experts.forward_dense(x_T)
    g = gates_TE.to(y_TE.dtype).reshape(*gates_TE.shape, *([1] * (y_TE.dim() - 2)))
    return (y_TE * g).sum(dim=1)
