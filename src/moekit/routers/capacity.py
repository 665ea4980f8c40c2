"""Expert capacity: drop token slots beyond ``ceil(capacity_factor * T * K / E)`` per expert.

Priority follows GShard/Switch: all first choices (k = 0) before any second choice, and within a
choice rank, earlier tokens first. ``capacity_factor=None`` is dropless (``inf``, like NaN, is refused:
use None).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from .._checks import check_positive
from ..types import RoutingDecision

__all__ = ["expert_capacity", "apply_capacity", "check_capacity_factor"]


def check_capacity_factor(capacity_factor: float | None) -> float | None:
    return None if capacity_factor is None else check_positive("capacity_factor", capacity_factor)


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert accepts: ``ceil(capacity_factor * T * K / E)``."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def _position_in_expert(ids_KT: Tensor, num_experts: int) -> Tensor:
    """Rank of each slot among the slots of its expert, in flattened (k, token) order."""
    flat = ids_KT.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(sizes, 0) - sizes
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(flat)
    rank[order] = rank_sorted
    return rank.reshape(ids_KT.shape)


def apply_capacity(decision: RoutingDecision, capacity_factor: float | None) -> RoutingDecision:
    """Mark slots over capacity as dropped (``kept_TK``); a no-op when ``capacity_factor`` is None."""
    if capacity_factor is None:
        return decision
    T, K = decision.ids_TK.shape
    cap = expert_capacity(T, K, decision.num_experts, capacity_factor)
    rank_KT = _position_in_expert(decision.ids_TK.t(), decision.num_experts)
    kept = (rank_KT < cap).t() & decision.kept_mask()
    return replace(decision, kept_TK=kept)
