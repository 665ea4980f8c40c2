"""``ean``: keep the experts with the largest expert activation norm (EAN).

Score of expert j: ``sum over its routed tokens x of ||f_j(x)||_2`` (REAP's ``ean_sum`` baseline,
https://arxiv.org/abs/2510.13999; ``reduction="mean"`` is ``ean_mean``, the sum divided by the
routed count, 0 for never-routed experts). Pruning as ``moekit.merging.methods._prune``.
"""

from __future__ import annotations


import torch
from torch import Tensor

from ..._checks import check_choice
from ...registry import EXPERT_METHODS
from ._prune import OutputNormPruning
from .base import Stats

__all__ = ["EANPruning", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean")


@EXPERT_METHODS.register("ean", paper="https://arxiv.org/abs/2510.13999",
                         summary="prune the experts with the smallest summed output norm on their routed tokens")  # fmt: skip
class EANPruning(OutputNormPruning):
    """EAN pruning (see the module docstring)."""

    name = "ean"
    protects = True
    option_help = {"reduction": "EAN score: sum (REAP's ean_sum) or mean of the output norms over routed tokens",
                   "max_tokens": "router logits sampled per block (exact form: redirect of pruned experts)",
                   "seed": "seed of the sampled tokens"}  # fmt: skip

    def __init__(self, *, reduction: str = "sum", max_tokens: int = 8192, seed: int = 0) -> None:
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.max_tokens, self.seed = max_tokens, seed

    def scores(self, stats: Stats) -> Tensor:
        s = stats["expert_output_norms"]
        if self.reduction == "sum":
            return s["norm_sums"].double()
        return torch.where(s["counts"] > 0, s["norm_sums"] / s["counts"].clamp_min(1e-300), torch.zeros_like(s["counts"]))
