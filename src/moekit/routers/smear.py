"""SMEAR's router: LayerNorm + bias-free linear with a small initial scale, softmax over experts,
expert dropout with renormalisation in training (Muqeeth et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import LinearScorer, Meta, Router

__all__ = ["SMEARRouter"]


@ROUTERS.register("smear", paper="https://arxiv.org/abs/2306.03745", summary="soft merging router (dense, per example)")
class SMEARRouter(Router):
    """Dense router for merged experts.

    ``probs = softmax(W LayerNorm(x))`` with ``W ~ N(0, init_std^2)`` so routing starts near uniform.
    In training each probability is zeroed with ``expert_dropout`` and the rest renormalised (if all
    are dropped the example keeps its undropped distribution). K = E: the weights cover all experts.
    """

    is_sparse = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        expert_dropout: float = 0.1,
        init_std: float = 1e-2,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, num_experts, check_finite=check_finite)
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        self.expert_dropout = expert_dropout
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.gate = LinearScorer(dim, num_experts, init_std=check_positive("init_std", init_std, allow_zero=True),
                                 device=device, dtype=dtype)

    @classmethod
    def for_bank(cls, experts: nn.Module, **kwargs: object) -> "SMEARRouter":
        """The default router of a merged-expert layer over ``experts`` (a moekit ``ExpertBank``)."""
        from ..experts.base import ExpertBank

        if not isinstance(experts, ExpertBank):
            raise TypeError(f"experts must be a moekit ExpertBank, got {type(experts).__name__}")
        return cls(experts.dim, experts.num_experts, **kwargs)  # type: ignore[arg-type]

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        logits = self.gate(self.norm(x_TD))
        probs = torch.softmax(logits, dim=-1)
        weights = probs
        if self.training and self.expert_dropout > 0:
            keep = torch.rand_like(probs) >= self.expert_dropout
            kept_mass = (probs * keep).sum(-1, keepdim=True)
            dropped = torch.where(keep, probs, 0.0) / kept_mass.clamp_min(1e-12)
            weights = torch.where(kept_mass > 0, dropped, probs)
        ids = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        return RoutingDecision(ids_TK=ids, weights_TK=weights, num_experts=self.num_experts, logits_TE=logits, probs_TE=probs)
