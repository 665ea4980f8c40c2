"""Balancers: stateful controllers that act on router logits *before* expert selection.

State lives in buffers (saved with the model, restored on load); updates happen outside autograd,
in training mode only, from the routing decision of the step (like BatchNorm's running stats).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import check_int, check_positive
from .types import RoutingDecision

__all__ = ["Balancer", "AuxFreeBias"]

#: reduces per-expert counts across processes (expert/data parallel); identity on one process
CountReducer = Callable[[Tensor], Tensor]


class Balancer(nn.Module):
    """Base class: ``selection_logits`` adjusts logits used only to pick experts; ``observe``
    updates the state from a training step's decision."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.count_reducer: CountReducer | None = None

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        raise NotImplementedError

    def observe(self, decision: RoutingDecision) -> None:
        raise NotImplementedError

    def _global_counts(self, decision: RoutingDecision) -> Tensor:
        counts = decision.counts()
        return counts if self.count_reducer is None else self.count_reducer(counts)


class AuxFreeBias(Balancer):
    """Auxiliary-loss-free load balancing (Wang et al. 2024, https://arxiv.org/abs/2408.15664).

    A per-expert bias is added to the logits for *selection only*; the combine weights still come
    from the unbiased logits. After each training step ``bias_e += rate * sign(mean_load - load_e)``.
    """

    def __init__(self, num_experts: int, *, rate: float = 1e-3) -> None:
        super().__init__(num_experts)
        self.rate = check_positive("rate", rate)
        self.register_buffer("bias", torch.zeros(num_experts))

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        return logits_TE + self.bias.to(logits_TE.dtype)

    @torch.no_grad()
    def observe(self, decision: RoutingDecision) -> None:
        counts = self._global_counts(decision)
        self.bias.add_(self.rate * torch.sign(counts.mean() - counts))
