"""Shared by the pruning methods: keep the G best-scored experts of a block.

``prune_by_score`` keeps the ``num_experts`` highest scores; ties go to the lower expert id (a
stable sort on ``(-score, id)``); protected experts (super experts) score ``+inf`` and are always
kept. Plain form: the kept experts keep their own router rows, biases and selection-bias entries,
so the router's softmax over the survivors renormalises (REAP's ``prune.py`` and NAEE do the same).
Exact form: the router is unchanged; a pruned expert's choices run the kept expert whose
router-logit column is most cosine-similar on the calibration tokens (M-SMoE's redirect).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..grouping import group_by_router_logits
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from .base import ExpertMethod, Stats
from .protection import protected_mask

__all__ = ["prune_by_score", "ranked", "keep_rows", "redirect", "OutputNormPruning"]


def ranked(score_E: Tensor, num_experts: int, protected_E: Tensor | None = None) -> Tensor:
    """Sorted ids ``[G]`` of the ``num_experts`` best scores (protected first, ties to the lower id)."""
    s = score_E.detach().to("cpu", torch.float64).clone()
    if torch.isnan(s).any():
        raise ValueError(f"expert scores must not be NaN, got {s.tolist()}")
    if protected_E is not None and protected_E.any():
        n = int(protected_E.sum())
        if n > num_experts:
            raise ValueError(
                f"{n} experts are protected super experts (ids {torch.nonzero(protected_E).flatten().tolist()}) but "
                f"only {num_experts} are kept; keep more experts or turn protection off (--no-protect-super-experts)"
            )
        s[protected_E] = float("inf")
    return torch.sort(-s, stable=True).indices[:num_experts].sort().values


def keep_rows(weights: ExpertLayerWeights, kept_G: Tensor) -> ExpertLayerWeights:
    """The block with only experts ``kept_G``: their tensors, router rows, bias and router extras."""
    pick = lambda t: t.detach()[kept_G.to(t.device)].clone()
    return weights.replace(
        params={k: pick(v) for k, v in weights.params.items()}, router_weight=pick(weights.router_weight),
        router_bias=None if weights.router_bias is None else pick(weights.router_bias),
        router_extras={k: pick(v) for k, v in weights.router_extras.items()},
    )  # fmt: skip


def redirect(stats: Stats, kept_G: Tensor, num_experts: int) -> Tensor:
    """``expert_map [E]``: kept experts to their own slot, pruned ones to the kept expert with the most
    similar router-logit column (``router_logits`` statistic); slot 0 when no logits were sampled."""
    logits = stats.get("router_logits", {}).get("logits")
    if logits is not None and logits.shape[0] > 0:
        return group_by_router_logits(logits, kept_G)
    out = torch.zeros(num_experts, dtype=torch.long)
    out[kept_G] = torch.arange(kept_G.shape[0])
    return out


def prune_by_score(weights: ExpertLayerWeights, score_E: Tensor, num_experts: int, stats: Stats) -> LayerMergeResult:
    """The block pruned to the ``num_experts`` best-scored experts (see the module docstring)."""
    E = weights.num_experts
    if score_E.shape != (E,):
        raise ValueError(f"expert scores must be [E={E}], got {tuple(score_E.shape)}")
    kept = ranked(score_E, num_experts, protected_mask(stats, E))
    return LayerMergeResult(weights=keep_rows(weights, kept), expert_map=redirect(stats, kept, E), dominant=kept)


class OutputNormPruning(ExpertMethod):
    """Base of the pruning methods scored from the ``expert_output_norms`` statistic (EAN, REAP): they
    observe routed counts, output norms and sampled router logits (``max_tokens``, ``seed``: for the
    exact form's redirect), rank the global budget by the same score, and keep the best-scored experts.
    Subclasses set ``max_tokens`` / ``seed`` and define ``scores``."""

    max_tokens: int
    seed: int

    def scores(self, stats: Stats) -> Tensor:
        """``[E]`` the score of every expert of a block (higher is kept)."""
        raise NotImplementedError

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "expert_output_norms": {},
                "router_logits": {"max_tokens": self.max_tokens, "seed": self.seed}}  # fmt: skip

    def budget_statistics(self) -> dict[str, dict[str, Any]]:
        return {"expert_output_norms": {}}

    def budget_score(self, stats: Stats) -> Tensor:
        return self.scores(stats)

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        return prune_by_score(weights, self.scores(stats), num_experts, stats)
