"""``mone``: replace pruned experts by novices, their mean output (Zhang et al., ICLR 2026,
https://arxiv.org/abs/2507.00390; code zxgx/mode-pd ``expert_prune_by_mone``).

Per expert j, over the calibration tokens routed to it: mean output ``mu_j`` and per-dimension
variance ``var_j`` of ``f_j(x)`` (statistic ``expert_output_moments``); routing score ``s_j`` = mean
over *all* tokens of j's gate (0 where not chosen; ``gate_sums``). Score (the code's ``fusion``
metric): ``||sqrt(var_j)||_2 * s_j`` -- low usage and a stable output mean redundant (the code's
``w * (1 - w)`` factor does not change the ranking and is dropped). The G best-scored experts are
kept (ties to the lower id; the code's ``<=`` threshold replaces extra experts on ties, we keep the
count exact); each other expert becomes a novice returning ``mu_j`` (0 if never routed) times its
gate, exactly where tokens were routed to it. The router is unchanged (exact form only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...registry import EXPERT_METHODS
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from ._prune import keep_rows, ranked
from .base import ExpertMethod, Stats
from .protection import protected_mask

__all__ = ["MoNE", "mone_scores"]


def mone_scores(stats: Stats) -> tuple[Tensor, Tensor]:
    """``(score [E], mean output [E, D])`` from ``expert_output_moments`` and ``gate_sums``."""
    m = stats["expert_output_moments"]
    counts = m["counts"].double().clamp_min(1e-300).unsqueeze(1)
    used = (m["counts"] > 0).unsqueeze(1)
    mean = torch.where(used, m["sums"].double() / counts, torch.zeros_like(m["sums"].double()))
    var = torch.where(used, m["squares"].double() / counts - mean * mean, torch.zeros_like(mean)).clamp_min(0)
    g = stats["gate_sums"]
    routing_score = g["gate_sums"].double() / max(float(g["weight"]), 1e-300)
    return var.sqrt().norm(dim=1) * routing_score, mean


@EXPERT_METHODS.register("mone", paper="https://arxiv.org/abs/2507.00390",
                         summary="prune low-usage, stable experts and replace each by its mean output (novice)")  # fmt: skip
class MoNE(ExpertMethod):
    """MoNE (see the module docstring); no options: the score and the novices come from the statistics."""

    name = "mone"
    protects = True
    novices = True

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "expert_output_moments": {}, "gate_sums": {}}

    def budget_statistics(self) -> dict[str, dict[str, Any]]:
        return {"expert_output_moments": {}, "gate_sums": {}}

    def budget_score(self, stats: Stats) -> Tensor:
        return mone_scores(stats)[0]

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        E = weights.num_experts
        score, mean = mone_scores(stats)
        kept = ranked(score, num_experts, protected_mask(stats, E))
        novice_mask = torch.ones(E, dtype=torch.bool)
        novice_mask[kept] = False
        expert_map = torch.zeros(E, dtype=torch.long)  # novices never run the bank; slot 0 is a placeholder
        expert_map[kept] = torch.arange(kept.shape[0])
        novices = mean.to(weights.params["down_proj"].dtype) * novice_mask.unsqueeze(1)
        return LayerMergeResult(weights=keep_rows(weights, kept), expert_map=expert_map, dominant=kept,
                                novices=novices, novice_mask=novice_mask)  # fmt: skip
