"""``reap``: Router-weighted Expert Activation Pruning (Lasby et al., ICLR 2026,
https://arxiv.org/abs/2510.13999; code CerebrasResearch/reap ``pruning_metrics.py``).

Score of expert j, as the official code computes it: the mean over the tokens routed to j (j among
the token's top-k) of ``g_j(x) * ||f_j(x)||_2``, with ``g`` the router's softmax over all E logits,
renormalised over the token's top-k when ``gate="renormalized"`` (the code's default since March
2026, ``renormalize_router_weights=True``: the chosen gates sum to 1). ``gate="softmax"`` is the
earlier default (no renormalisation; what the official code still does for Mixtral, whose config
has no ``norm_topk_prob``), ``gate="model"`` the gate the block really applied (llm-compressor's
port). Never-routed experts score 0 and go first. Every block loses the same number of experts
(uniform budget, REAP's rule); ties go to the lower expert id (the code's ``torch.topk`` leaves
them unspecified). Pruning as ``moekit.merging.methods._prune``.

The "routed" set is the block's real routing; the official observer takes the top-k of the raw
logits, which is the same for softmax routers without a selection bias.
"""

from __future__ import annotations


import torch
from torch import Tensor

from ..._checks import check_choice
from ...registry import EXPERT_METHODS
from ._prune import OutputNormPruning
from .base import Stats

__all__ = ["REAP", "GATES", "reap_scores"]

#: which gate multiplies the output norm: renormalised top-k softmax, full softmax, the model's own gate
GATES = {"renormalized": "renorm_norm_sums", "softmax": "prob_norm_sums", "model": "gated_norm_sums"}


def reap_scores(norms: dict[str, Tensor], gate: str = "renormalized") -> Tensor:
    """``[E]`` REAP saliency from the ``expert_output_norms`` statistic (0 where nothing was routed)."""
    total, counts = norms[GATES[gate]].double(), norms["counts"].double()
    return torch.where(counts > 0, total / counts.clamp_min(1e-300), torch.zeros_like(total))


@EXPERT_METHODS.register("reap", paper="https://arxiv.org/abs/2510.13999",
                         summary="prune the experts with the smallest mean gate x output norm on their routed tokens")  # fmt: skip
class REAP(OutputNormPruning):
    """REAP pruning (see the module docstring)."""

    name = "reap"
    protects = True
    option_help = {"gate": "REAP's gate: renormalized (top-k renormalised softmax, the official default), softmax "
                           "(full softmax, the earlier default) or model (the gate the block applied)",
                   "max_tokens": "router logits sampled per block (exact form: redirect of pruned experts)",
                   "seed": "seed of the sampled tokens"}  # fmt: skip

    def __init__(self, *, gate: str = "renormalized", max_tokens: int = 8192, seed: int = 0) -> None:
        self.gate = check_choice("gate", gate, tuple(GATES))
        self.max_tokens, self.seed = max_tokens, seed

    def scores(self, stats: Stats) -> Tensor:
        return reap_scores(dict(stats["expert_output_norms"]), self.gate)
