"""Dense softmax gating: every expert, weighted by ``softmax(x W)`` (Jacobs et al. 1991)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import LinearScorer, Meta, Router

__all__ = ["SoftmaxRouter"]


@ROUTERS.register("softmax", paper="https://doi.org/10.1162/neco.1991.3.1.79", summary="dense softmax gate over all experts")
class SoftmaxRouter(Router):
    """Dense gate: ``K = E``, ids are ``0..E-1`` for every token, weights the softmax probabilities."""

    is_sparse = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, num_experts, check_finite=check_finite)
        self.gate = LinearScorer(dim, num_experts, device=device, dtype=dtype)

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        logits = self.gate(x_TD)
        probs = torch.softmax(logits, dim=-1)
        ids = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        return RoutingDecision(ids_TK=ids, weights_TK=probs, num_experts=self.num_experts, logits_TE=logits, probs_TE=probs)
