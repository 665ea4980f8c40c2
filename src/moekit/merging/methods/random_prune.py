"""``random``: keep a seeded random subset of each block's experts (a data-free pruning control).

One ``torch.Generator`` seeded with ``seed`` draws a random score per expert for each block in the
order the pipeline reduces them, so a run is reproducible. Pruning as ``_prune`` (super experts are
still protected, so the control differs from the scored methods only in the ranking).
"""

from __future__ import annotations

from typing import Any

import torch

from ...registry import EXPERT_METHODS
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from ._prune import prune_by_score
from .base import ExpertMethod, Stats

__all__ = ["RandomPruning"]


@EXPERT_METHODS.register("random", summary="control: keep a seeded random subset of experts per block")
class RandomPruning(ExpertMethod):
    """The random-pruning control (see the module docstring)."""

    name = "random"
    protects = True
    option_help = {"seed": "seed of the random scores and of the sampled tokens",
                   "max_tokens": "router logits sampled per block (exact form: redirect of pruned experts)"}  # fmt: skip

    def __init__(self, *, seed: int = 0, max_tokens: int = 8192) -> None:
        self.seed, self.max_tokens = seed, max_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "router_logits": {"max_tokens": self.max_tokens, "seed": self.seed}}

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        score = torch.rand(weights.num_experts, generator=self.generator, dtype=torch.float64)
        return prune_by_score(weights, score, num_experts, stats)
