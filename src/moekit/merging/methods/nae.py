"""``nae``: NAEE's per-layer expert-subset search (Lu et al., ACL 2024, https://arxiv.org/abs/2402.14800;
code Lucky-Lance/Expert_Sparsity ``model/wrapper.py::enumerate``).

On sampled calibration tokens of the block (statistic ``layer_io``: input x, router logits, the
experts chosen and their gates) the original output is ``Z = sum_k g_k f_{e_k}(x)``. For every subset
S of G experts (``itertools.combinations`` order) the pruned block is recomputed: logits of dropped
experts at -inf, the router's softmax and top-k over the survivors, the chosen probabilities
renormalised when the block's gates summed to 1 on the calibration tokens (Mixtral-style), else used
as they are; loss ``||Z - Z_S||_F^2`` (fp64). The first subset with the smallest loss wins (strict
``<``, so ties go to the earlier subset in combinations order). Subsets must contain the protected
super experts. The search needs ``C(E, G) <= max_subsets`` (Mixtral: C(8, 6) = 28, C(8, 4) = 70) and
a softmax router; larger blocks are refused with the count. Pruning as ``_prune`` (exact-form
redirect by router-logit similarity on the sampled tokens).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from ...registry import EXPERT_METHODS
from ..grouping import expert_outputs
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec
from ._prune import keep_rows, redirect
from .base import ExpertMethod, Stats
from .protection import protected_mask

__all__ = ["NAEE", "subset_output", "renormalises"]


def renormalises(gates_TK: Tensor) -> bool:
    """Whether the block's chosen gates sum to 1 per token (then pruned gates are renormalised too)."""
    return bool(torch.allclose(gates_TK.double().sum(1), torch.ones(gates_TK.shape[0], dtype=torch.float64), atol=1e-4))


def subset_output(outputs_ETD: Tensor, logits_TE: Tensor, keep_E: Tensor, top_k: int, renormalise: bool) -> Tensor:
    """The block's output ``[T, D]`` when only the experts ``keep_E`` (bool ``[E]``) remain."""
    logits = logits_TE.double().masked_fill(~keep_E, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    k = min(top_k, int(keep_E.sum()))
    top, ids = probs.topk(k, dim=-1)
    gates = top / top.sum(-1, keepdim=True) if renormalise else top
    dense = torch.zeros_like(probs).scatter(1, ids, gates)
    return torch.einsum("te,etd->td", dense, outputs_ETD)


@EXPERT_METHODS.register("nae", paper="https://arxiv.org/abs/2402.14800",
                         summary="NAEE: per block, the expert subset whose output best reconstructs the original")  # fmt: skip
class NAEE(ExpertMethod):
    """NAEE's subset search (see the module docstring)."""

    name = "nae"
    protects = True
    option_help = {"max_subsets": "largest number of expert subsets C(E, G) searched per block",
                   "max_tokens": "calibration tokens sampled per block for the reconstruction error",
                   "seed": "seed of the sampled tokens"}  # fmt: skip

    def __init__(self, *, max_subsets: int = 5000, max_tokens: int = 2048, seed: int = 0) -> None:
        self.max_subsets, self.max_tokens, self.seed = max_subsets, max_tokens, seed

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {"counts": {}, "layer_io": {"max_tokens": self.max_tokens, "seed": self.seed}}

    def check(self, num_experts: int, kept: int) -> None:
        """Refuse blocks whose subset count exceeds ``max_subsets``."""
        n = math.comb(num_experts, kept)
        if n > self.max_subsets:
            raise ValueError(
                f"nae enumerates every subset of {kept} of {num_experts} experts per block: C({num_experts}, {kept}) = {n} "
                f"exceeds max_subsets={self.max_subsets}; raise max_subsets or use another method (reap, frequency)"
            )

    @torch.no_grad()
    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        E, G = weights.num_experts, num_experts
        self.check(E, G)
        if routing.score == "sigmoid":
            raise ValueError("nae recomputes a softmax router over the surviving experts; this block scores with sigmoid")
        io = stats["layer_io"]
        x, logits, ids, gates = io["inputs"], io["logits"], io["ids"], io["gates"]
        if x.shape[0] == 0:
            raise ValueError("nae needs calibration tokens of the block (layer_io sampled none)")
        outputs = expert_outputs(weights, x).double()  # [E, T, D]
        dense = torch.zeros(x.shape[0], E, dtype=torch.float64).scatter_add(1, ids, gates.double())
        target = torch.einsum("te,etd->td", dense, outputs)
        renorm = renormalises(gates)
        protected = protected_mask(stats, E)
        best: tuple[float, tuple[int, ...]] | None = None
        for subset in itertools.combinations(range(E), G):
            keep = torch.zeros(E, dtype=torch.bool)
            keep[list(subset)] = True
            if bool((protected & ~keep).any()):
                continue
            loss = float((target - subset_output(outputs, logits, keep, routing.top_k, renorm)).pow(2).sum())
            if best is None or loss < best[0]:
                best = (loss, subset)
        if best is None:
            raise ValueError(f"no subset of {G} experts holds all {int(protected.sum())} protected super experts")
        kept = torch.tensor(best[1], dtype=torch.long)
        stats_logits = {"router_logits": {"logits": logits}}
        return LayerMergeResult(weights=keep_rows(weights, kept), expert_map=redirect(stats_logits, kept, E), dominant=kept)
