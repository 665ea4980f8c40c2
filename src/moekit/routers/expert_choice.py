"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_positive
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import LinearScorer, Meta, Router
from .capacity import expert_capacity

__all__ = ["ExpertChoiceRouter"]


@ROUTERS.register("expert_choice", paper="https://arxiv.org/abs/2202.09368", summary="experts choose their top-C tokens")
class ExpertChoiceRouter(Router):
    """Scores ``S = softmax(x W)`` over experts; expert e takes the ``C = ceil(cf * T / E)`` tokens
    with the largest ``S[:, e]`` and weights them by ``S[t, e]``.

    The decision has ``K = E`` slots per token (slot e = expert e) with ``kept_TK`` marking which
    experts chose the token: a token may be served by 0..E experts, balance is perfect by construction.
    Note: choosing over the batch lets a token's routing depend on other tokens of the batch, so it is
    not causal for autoregressive decoding.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        capacity_factor: float = 2.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, num_experts, check_finite=check_finite)
        self.capacity_factor = check_positive("capacity_factor", capacity_factor)
        self.gate = LinearScorer(dim, num_experts, device=device, dtype=dtype)

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        logits = self.gate(x_TD)
        probs = torch.softmax(logits, dim=-1)
        cap = min(T, expert_capacity(T, 1, E, self.capacity_factor))
        chosen_EC = probs.t().topk(cap, dim=-1).indices
        kept = torch.zeros(E, T, dtype=torch.bool, device=x_TD.device)
        kept.scatter_(1, chosen_EC, True)
        ids = torch.arange(E, device=x_TD.device).expand(T, -1)
        return RoutingDecision(
            ids_TK=ids, weights_TK=probs, num_experts=E, logits_TE=logits, probs_TE=probs, kept_TK=kept.t()
        )
