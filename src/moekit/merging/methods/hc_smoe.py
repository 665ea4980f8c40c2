"""``hc-smoe``: hierarchical clustering of experts by their outputs, then frequency-weighted merging
(Chen et al., ICML 2025, https://arxiv.org/abs/2410.08589; code wazenmai/HC-SMoE).

Feature of expert j: its mean output over *every* calibration token entering the block (statistic
``all_token_output_sums``; E x the routed compute). Agglomerative clustering to G clusters with
Euclidean distances and the paper's ``average`` linkage (``complete`` and ``single`` for ablations;
the official ``complete`` merges the farthest pair, a bug we do not copy), by Lance-Williams updates:
at each step the two clusters at the smallest linkage distance merge; ties go to the pair whose
smallest member ids are lexicographically smallest. Protected super experts are at infinite
distance from everything, so they stay singletons. Each cluster's dominant is the member nearest
the cluster's mean feature (lower id on ties); every tensor is averaged with routed-count weights
(``merge="frequency"``, the paper's ``--merge freq``) or equal weights (``"uniform"``). The exact
form keeps the router (the official "redirect"); the plain form folds it (``fold``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._checks import check_choice
from ...registry import EXPERT_METHODS
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from ._groups import merge_by_groups, relabel
from .base import ExpertMethod, Stats
from .protection import protected_mask

__all__ = ["HCSMoE", "LINKAGES", "agglomerate"]

LINKAGES = ("average", "complete", "single")


def agglomerate(features_ED: Tensor, num_clusters: int, *, linkage: str = "average",
                singletons: Tensor | None = None) -> Tensor:  # fmt: skip
    """Cluster label ``[E]`` (0..G-1, numbered by first member) of agglomerative clustering.

    Args:
        features_ED: one feature row per expert.
        num_clusters: G.
        linkage: ``average`` (mean pairwise distance), ``complete`` (max) or ``single`` (min).
        singletons: ``[E]`` bool, experts that never merge (infinite distance).
    """
    check_choice("linkage", linkage, LINKAGES)
    E = features_ED.shape[0]
    x = features_ED.detach().double().cpu()
    dist = torch.cdist(x, x)
    fixed = torch.zeros(E, dtype=torch.bool) if singletons is None else singletons.bool().cpu()
    n_fixed = int(fixed.sum())
    if n_fixed > num_clusters or (n_fixed == num_clusters and n_fixed < E):
        raise ValueError(f"{n_fixed} experts must stay singletons, so {num_clusters} clusters cannot hold the rest")
    dist[fixed, :] = float("inf")
    dist[:, fixed] = float("inf")
    dist.fill_diagonal_(float("inf"))
    members = {i: [i] for i in range(E)}
    while len(members) > num_clusters:
        alive = sorted(members, key=lambda c: min(members[c]))
        best: tuple[float, int, int] | None = None
        for ia, a in enumerate(alive):
            for b in alive[ia + 1:]:
                d = float(dist[a, b])
                if best is None or d < best[0]:
                    best = (d, a, b)
        assert best is not None
        _, a, b = best
        na, nb = len(members[a]), len(members[b])
        if linkage == "average":
            new = (na * dist[a] + nb * dist[b]) / (na + nb)
        elif linkage == "complete":
            new = torch.maximum(dist[a], dist[b])
        else:
            new = torch.minimum(dist[a], dist[b])
        dist[a], dist[:, a] = new, new
        dist[a, a] = float("inf")
        dist[b, :], dist[:, b] = float("inf"), float("inf")
        members[a] = sorted(members[a] + members.pop(b))
    labels = torch.empty(E, dtype=torch.long)
    for g, c in enumerate(sorted(members, key=lambda c: min(members[c]))):
        labels[members[c]] = g
    return labels


@EXPERT_METHODS.register("hc-smoe", paper="https://arxiv.org/abs/2410.08589",
                         summary="cluster experts by mean output on all tokens (average linkage), frequency-weighted merge")  # fmt: skip
class HCSMoE(ExpertMethod):
    """HC-SMoE (see the module docstring)."""

    name = "hc-smoe"
    protects = True
    option_help = {"linkage": "agglomerative linkage: average (the paper), complete or single",
                   "merge": "how a cluster is averaged: frequency (routed counts, the paper; the default) or uniform",
                   "fold": "plain-form router rows of a group: lse or dominant (default: lse for softmax routers)",
                   "max_tokens": "router logits sampled per block (for the plain-form fold)",
                   "seed": "seed of the sampled tokens"}  # fmt: skip

    def __init__(self, *, linkage: str = "average", merge: str | None = None, fold: str | None = None,
                 max_tokens: int = 8192, seed: int = 0) -> None:  # fmt: skip
        self.linkage = check_choice("linkage", linkage, LINKAGES)
        self.merge = check_choice("merge", merge or "frequency", ("frequency", "uniform"))
        self.fold, self.max_tokens, self.seed = fold, max_tokens, seed

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "all_token_output_sums": {},
                "router_logits": {"max_tokens": self.max_tokens, "seed": self.seed}}  # fmt: skip

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        E = weights.num_experts
        sums = stats["all_token_output_sums"]
        features = sums["sums"].double() / max(float(sums["tokens"]), 1e-300)
        labels = agglomerate(features, num_experts, linkage=self.linkage, singletons=protected_mask(stats, E))
        dominant_of = {}
        for g in range(num_experts):
            ids = torch.nonzero(labels == g).flatten()
            centre = features[ids].mean(0, keepdim=True)
            dominant_of[g] = int(ids[torch.sort(torch.cdist(features[ids], centre).flatten(), stable=True).indices[0]])
        groups, dominant = relabel(labels, dominant_of)
        counts = stats["counts"]["counts"].double()
        alpha = counts if self.merge == "frequency" else torch.ones(E, dtype=torch.float64)
        fold = self.fold or ("dominant" if routing.score == "sigmoid" else "lse")
        return merge_by_groups(weights, groups, dominant, alpha, stats.get("router_logits", {}).get("logits"), fold)
