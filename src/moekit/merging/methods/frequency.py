"""``frequency``: keep the G most-routed experts of each block (frequency pruning).

The standard pruning baseline (REAP's ``frequency``, HC-SMoE's "F-prune"; MC-SMoE's global budget
when ``budget="global"``). Ties go to the lower expert id. Plain form: the kept experts keep their
own router rows (the router's softmax over the survivors renormalises). Exact form: the router is
unchanged and a pruned expert's choices run the kept expert with the most similar router-logit
column (M-SMoE's "prune" baseline).
"""

from __future__ import annotations

from typing import Any

from ...registry import EXPERT_METHODS
from ..layer import merge_layer
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from .base import ExpertMethod, Stats

__all__ = ["FrequencyPruning"]


@EXPERT_METHODS.register("frequency", paper="https://arxiv.org/abs/2510.13999",
                         summary="keep the most-routed experts; pruned ones' choices redirect (exact form)")  # fmt: skip
class FrequencyPruning(ExpertMethod):
    """Options: ``max_tokens`` (router logits kept per block for the exact form's redirect)."""

    name = "frequency"
    #: help of each option on the command line (``moekit compress``)
    option_help = {"max_tokens": "router logits kept per block for the exact form's redirect"}

    def __init__(self, *, max_tokens: int = 8192) -> None:
        self.max_tokens = max_tokens

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "router_logits": {"max_tokens": self.max_tokens}}

    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        return merge_layer(
            weights, stats["counts"]["counts"], stats["router_logits"]["logits"], num_experts, method="prune",
            fold="dominant",
        )  # fmt: skip
