"""Shared by the merging methods: groups -> ``LayerMergeResult`` (weighted average per group).

``merge_by_groups`` takes any partition of the E experts (cluster labels), orders the groups by their
dominant expert's id (the ``LayerMergeResult`` convention), averages every expert tensor within a group
with the given weights (``moekit.merging.merge.merge_groups``; an all-zero group averages uniformly)
and folds the router for the plain form (``fold_router``: ``"lse"`` least-squares group logit, or the
dominant's row). The exact form keeps the router; each expert's choices run its group's merged expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..merge import fold_router, merge_groups
from ..weights import ExpertLayerWeights, LayerMergeResult

__all__ = ["merge_by_groups", "relabel"]


def relabel(labels_E: Tensor, dominant_of: dict[int, int]) -> tuple[Tensor, Tensor]:
    """``(groups_E, dominant_G)`` with groups numbered by increasing dominant id.

    ``labels_E``: any cluster label per expert; ``dominant_of``: label -> its dominant expert id."""
    dominant = torch.tensor(sorted(dominant_of.values()), dtype=torch.long)
    slot = {d: g for g, d in enumerate(dominant.tolist())}
    groups = torch.tensor([slot[dominant_of[int(lab)]] for lab in labels_E.tolist()], dtype=torch.long)
    return groups, dominant


def merge_by_groups(
    weights: ExpertLayerWeights, groups_E: Tensor, dominant_G: Tensor, alpha_E: Tensor,
    router_logits_TE: Tensor | None, fold: str,
) -> LayerMergeResult:  # fmt: skip
    """The block with one expert per group (see the module docstring)."""
    G = dominant_G.shape[0]
    params = merge_groups(weights.params, groups_E, G, alpha_E)
    logits = router_logits_TE if router_logits_TE is not None and router_logits_TE.shape[0] > 0 else None
    how = fold if logits is not None else "dominant"
    router_w, router_b = fold_router(weights.router_weight, weights.router_bias, groups_E, dominant_G, logits, how=how)
    extras = {name: t.detach()[dominant_G].clone() for name, t in weights.router_extras.items()}
    merged = weights.replace(params=params, router_weight=router_w, router_bias=router_b, router_extras=extras)
    return LayerMergeResult(weights=merged, expert_map=groups_E, dominant=dominant_G)
