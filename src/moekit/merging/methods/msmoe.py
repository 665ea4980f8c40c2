"""``m-smoe``: M-SMoE merging (Li et al., ICLR 2024, https://arxiv.org/abs/2310.01334).

Dominant experts by activation frequency, the others grouped by router-logit cosine similarity,
permutation-aligned and averaged with frequency weights (``moekit.merging.layer.merge_layer``).
``recipe`` picks one of ``moekit.registry.MERGE_METHODS`` (``mcsmoe`` = the paper; ``prune``,
``uniform``, ``random`` = its ablations); the other options override one part of the recipe.
Sigmoid-scored routers (DeepSeek-V3) have no softmax mass to fold, so the plain-form router keeps
each group's dominant row unless ``fold`` says otherwise.
"""

from __future__ import annotations

from typing import Any

from ...registry import EXPERT_METHODS, MERGE_METHODS
from ..layer import merge_layer
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from .base import ExpertMethod, Stats

__all__ = ["MSMoE"]


@EXPERT_METHODS.register("m-smoe", paper="https://arxiv.org/abs/2310.01334",
                         summary="M-SMoE: frequency-chosen dominant experts, router-logit grouping, aligned frequency-weighted merge")  # fmt: skip
class MSMoE(ExpertMethod):
    """Options: ``recipe`` (MERGE_METHODS name, default ``"mcsmoe"``), ``grouping``, ``merge``,
    ``align``, ``anchor`` (``"dominant"``; ``"first"``: each group's lowest id, as the official code; or
    an expert id), ``fold`` (plain-form router: ``"lse"`` or ``"dominant"``), ``seed`` (random grouping),
    ``max_tokens`` (router logits and inputs kept per block)."""

    name = "m-smoe"
    #: help of each option on the command line (``moekit compress``)
    option_help = {
        "recipe": "merge recipe (moekit.registry.MERGE_METHODS): mcsmoe = the paper, prune / uniform / random = its ablations",
        "grouping": "how non-dominant experts join a group (default: the recipe's; router-logits in the paper)",
        "merge": "how a group's experts are averaged (default: the recipe's; activation-frequency weights in the paper)",
        "align": "permutation-align experts to the anchor before averaging (default: the recipe's; on in the paper)",
        "anchor": "expert the others are aligned to: 'dominant' or an expert id (the official code uses 0)",
        "fold": "plain-form router rows of a group: lse or dominant (default: lse for softmax routers, dominant for sigmoid)",
        "seed": "seed of random grouping",
        "max_tokens": "router logits and inputs kept per block for grouping",
    }

    def __init__(
        self, *, recipe: str = "mcsmoe", grouping: str | None = None, merge: str | None = None,
        align: bool | None = None, anchor: str | int = "dominant", fold: str | None = None, seed: int = 0,
        max_tokens: int = 8192,
    ) -> None:  # fmt: skip
        self.recipe = MERGE_METHODS.entry(recipe).name
        self.grouping = grouping if grouping is not None else MERGE_METHODS.get(recipe)().grouping
        self.options: dict[str, Any] = {"grouping": grouping, "merge": merge, "align": align, "anchor": anchor, "seed": seed}
        self.fold, self.max_tokens = fold, max_tokens

    def statistics(self) -> dict[str, dict[str, Any]]:
        specs: dict[str, dict[str, Any]] = {"counts": {}, "router_logits": {"max_tokens": self.max_tokens}}
        if self.grouping == "expert_output":
            specs["router_inputs"] = {"max_tokens": self.max_tokens}
        return specs

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        fold = self.fold or ("dominant" if routing.score == "sigmoid" else "lse")
        inputs = stats["router_inputs"]["inputs"] if "router_inputs" in stats else None
        return merge_layer(
            weights, stats["counts"]["counts"], stats["router_logits"]["logits"], num_experts, method=self.recipe,
            calib_inputs_TD=inputs, fold=fold, **{k: v for k, v in self.options.items() if v is not None},
        )  # fmt: skip
