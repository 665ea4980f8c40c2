"""Sparse dispatch: sort token slots by expert, run each expert on its rows, scatter back weighted.

``dispatch`` is the fast path (one grouped call per weight); ``dispatch_reference`` is the plain
per-expert loop that every fast path is tested against (outputs and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..types import RoutingDecision
from .base import ExpertBank

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch", "dispatch_reference", "combine_dense"]


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


def _scatter_weighted(y_N: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    w = plan.weight_N.to(y_N.dtype).reshape(-1, *([1] * (y_N.dim() - 1)))
    out = y_N.new_zeros(num_tokens, *y_N.shape[1:])
    return out.index_add(0, plan.token_N, y_N * w)


def dispatch(experts: ExpertBank, x_T: Tensor, decision: RoutingDecision) -> Tensor:
    """Sparse MoE combine ``y_t = sum_k w_tk * expert_{id_tk}(x_t)`` over kept slots.

    Args:
        experts: the bank.
        x_T: ``[T, D]`` tokens (or ``[T, C, H, W]`` images for conv banks).
        decision: routing for the T tokens.
    Returns:
        ``[T, out_dim]`` (or images); tokens with no kept slot get zeros.
    """
    plan = plan_dispatch(decision)
    y_N = experts.grouped_forward(x_T[plan.token_N], experts.stacked_parameters(), plan.sizes_E)
    return _scatter_weighted(y_N, plan, x_T.shape[0])


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
