"""``uniform``: merge each block's experts in seeded random groups of equal size with equal weights
(a data-free merging control, the counterpart of ``random`` for pruning).

A seeded permutation deals the experts round-robin into G groups (sizes differ by at most one);
each group's dominant is its lowest id; every tensor is the plain average of the group. Protected
super experts each get a group of their own first. Router as ``_groups.merge_by_groups``.
"""

from __future__ import annotations

from typing import Any

import torch

from ...registry import EXPERT_METHODS
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from ._groups import merge_by_groups, relabel
from .base import ExpertMethod, Stats
from .protection import protected_mask

__all__ = ["UniformMerge"]


@EXPERT_METHODS.register("uniform", summary="control: equal-weight merge of seeded random equal-size groups")
class UniformMerge(ExpertMethod):
    """The uniform-merging control (see the module docstring)."""

    name = "uniform"
    protects = True
    option_help = {"seed": "seed of the random groups and of the sampled tokens",
                   "fold": "plain-form router rows of a group: lse or dominant (default: lse for softmax routers)",
                   "max_tokens": "router logits sampled per block (for the plain-form fold)"}  # fmt: skip

    def __init__(self, *, seed: int = 0, fold: str | None = None, max_tokens: int = 8192) -> None:
        self.seed, self.fold, self.max_tokens = seed, fold, max_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "router_logits": {"max_tokens": self.max_tokens, "seed": self.seed}}

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        E, G = weights.num_experts, num_experts
        protected = protected_mask(stats, E)
        singles = torch.nonzero(protected).flatten().tolist()
        if len(singles) > G or (len(singles) == G and G < E):
            raise ValueError(f"{len(singles)} protected super experts leave no group for the other experts when "
                             f"keeping {G}; keep more experts or turn protection off")  # fmt: skip
        rest = [e for e in torch.randperm(E, generator=self.generator).tolist() if e not in set(singles)]
        labels = torch.empty(E, dtype=torch.long)
        for g, e in enumerate(singles):
            labels[e] = g
        for i, e in enumerate(rest):
            labels[e] = len(singles) + i % (G - len(singles))
        dominant_of = {g: int(torch.nonzero(labels == g).min()) for g in range(G)}
        groups, dominant = relabel(labels, dominant_of)
        logits = stats.get("router_logits", {}).get("logits")
        fold = self.fold or ("dominant" if routing.score == "sigmoid" else "lse")
        return merge_by_groups(weights, groups, dominant, torch.ones(E, dtype=torch.float64), logits, fold)
