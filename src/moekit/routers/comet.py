"""COMET (Ibrahim et al., KDD 2023, https://arxiv.org/abs/2306.02824): a cardinality-constrained gate
made of ``k`` soft binary trees whose smooth-step splits saturate to hard routing.

Each tree has ``n - 1`` internal nodes and ``n`` leaves in heap order (node ``v`` has children
``2v+1``/``2v+2``; nodes ``>= n-1`` are leaves, leaf ``j`` is node ``n-1+j``), so any ``n`` works.
Node ``v`` of tree ``i`` sends the input left with probability ``S_gamma(w_iv . x + b_iv)``;
``P_ij`` is the product along the root-to-leaf path. Leaf ``j`` of tree ``i`` has a scorer
``a_ij = o_ij . x + c_ij``; the tree weights are one softmax over all ``k n`` scores
``a_ij + log P_ij`` (``log 0 = -inf``), and expert ``j`` gets ``g_j = sum_i ghat_ij``. Once every
split is saturated each tree puts all its mass on one leaf, so ``||g||_0 <= k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import Meta, Router
from .smooth_step import check_gamma, selector_entropy, smooth_step, sparse_decision

__all__ = ["COMETRouter", "leaf_paths"]


def leaf_paths(num_leaves: int) -> Tensor:
    """``[n, depth]`` indices into ``cat(S_v, 1 - S_v, 1)`` (length ``2(n-1)+1``) along each leaf's path.

    Entry ``v`` picks "go left at node v", ``n-1+v`` "go right at node v", ``2(n-1)`` is a padding 1
    for leaves on the shallower level (``depth = ceil(log2 n)``).
    """
    n = num_leaves
    depth = math.ceil(math.log2(n)) if n > 1 else 0
    pad = 2 * (n - 1)
    rows = []
    for j in range(n):
        node, steps = n - 1 + j, []
        while node > 0:
            parent = (node - 1) // 2
            steps.append(parent if node == 2 * parent + 1 else n - 1 + parent)
            node = parent
        rows.append(steps[::-1] + [pad] * (depth - len(steps)))
    return torch.tensor(rows, dtype=torch.long).reshape(n, depth)


@ROUTERS.register(
    "comet",
    paper="https://arxiv.org/abs/2306.02824",
    summary="COMET: k smooth-step trees, exactly <= k experts once saturated",
)
class COMETRouter(Router):
    """COMET tree gate over ``num_experts`` leaves with at most ``k`` non-zeros once saturated.

    Args:
        dim, num_experts, k: input width, n (leaves per tree), number of trees (the cardinality bound).
        gamma: smooth-step band width (> 0).
        split_bias: learn a bias per split (the TF code does; the PyTorch COMET-BERT code does not).

    The decision holds only experts with non-zero weight (``sparse_decision``), so sparse dispatch
    runs exactly the experts the gate uses: at most ``k`` once saturated. ``aux["entropy_reg"]``
    (unweighted) = mean over tokens of ``sum_i H(P_i)``, the entropy of each tree's leaf distribution.
    Published initialisation: splits ~ U(-gamma/100, gamma/100) (all inputs start inside the soft
    band), leaf weights ~ U(-0.05, 0.05), leaf bias 0.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 2,
        *,
        gamma: float = 1.0,
        split_bias: bool = True,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, k, check_finite=check_finite)
        self.gamma = check_gamma(gamma)
        n = num_experts
        kw = {"device": device, "dtype": dtype}
        self.split = nn.Linear(dim, k * (n - 1), bias=split_bias, **kw)
        self.leaf = nn.Linear(dim, k * n, **kw)
        nn.init.uniform_(self.split.weight, -self.gamma / 100, self.gamma / 100)
        if self.split.bias is not None:
            nn.init.uniform_(self.split.bias, -self.gamma / 100, self.gamma / 100)
        nn.init.uniform_(self.leaf.weight, -0.05, 0.05)
        nn.init.zeros_(self.leaf.bias)
        self.register_buffer("paths", leaf_paths(n).to(device), persistent=False)

    def _linear(self, layer: nn.Linear, x: Tensor) -> Tensor:
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, layer.weight.float(), bias)

    def split_logits(self, x_TD: Tensor) -> Tensor:
        """Split pre-activations ``[T, k, n-1]`` (fp32)."""
        return self._linear(self.split, x_TD.float()).reshape(x_TD.shape[0], self.k, self.num_experts - 1)

    def leaf_probabilities(self, split_TKV: Tensor) -> Tensor:
        """``P`` ``[T, k, n]``: each tree's routing probability of every leaf (rows sum to 1)."""
        s = smooth_step(split_TKV, self.gamma)
        factors = torch.cat([s, 1 - s, torch.ones_like(s[..., :1])], dim=-1)
        along_paths = factors.index_select(-1, self.paths.reshape(-1))
        return along_paths.reshape(*s.shape[:-1], *self.paths.shape).prod(-1)

    def is_saturated(self, x_TD: Tensor) -> Tensor:
        """Bool ``[T]``: every tree routes the token to a single leaf with probability 1."""
        return (self.leaf_probabilities(self.split_logits(x_TD)) == 1).any(-1).all(-1)

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        split = self.split_logits(x_TD)
        leaf_scores = self._linear(self.leaf, x_TD.float()).reshape(x_TD.shape[0], self.k, self.num_experts)
        if self.check_finite:
            check_finite(split, self.layer_name)
            check_finite(leaf_scores, self.layer_name)
        P = self.leaf_probabilities(split)
        alive = P > 0
        log_P = torch.where(alive, torch.log(torch.where(alive, P, torch.ones_like(P))), float("-inf"))
        scores = (leaf_scores + log_P).flatten(1)  # one softmax over all k*n leaves
        ghat = torch.softmax(scores, dim=-1).reshape_as(P)
        gates = ghat.sum(1)  # leaf j of every tree -> expert j
        aux = {"entropy_reg": selector_entropy(P).sum() / max(x_TD.shape[0], 1)}  # 0 on no token
        return sparse_decision(gates, self.k, probs_TE=gates, aux=aux)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"
