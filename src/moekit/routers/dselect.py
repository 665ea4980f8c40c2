"""DSelect-k (Hazimeh et al., NeurIPS 2021, https://arxiv.org/abs/2106.03760): a differentiable gate
with exactly ``<= k`` non-zero expert weights once its smooth-steps saturate.

Each of ``k`` single-expert selectors holds ``m = ceil(log2 n)`` logits ``z``; expert ``j`` (binary
code of ``j``, most significant bit first) gets ``r_j = prod_t (S(z_t) if bit_t(j) else 1 - S(z_t))``.
The weights are ``q = sum_i softmax(alpha)_i r(z_i)``. With ``conditioning="example"`` ``z`` and
``alpha`` are linear in the input; with ``"task"`` they are free parameters (one static gate per task,
as in multi-gate MoE). Official code: google-research/dselect_k_moe (Keras; runs every expert).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_finite
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import Meta, Router
from .smooth_step import check_gamma, selector_entropy, smooth_step, sparse_decision

__all__ = ["DSelectKRouter", "binary_codes"]

CONDITIONINGS = ("example", "task")


def binary_codes(num_experts: int, device: torch.device | str | None = None) -> Tensor:
    """Bool ``[n, ceil(log2 n)]``: row ``j`` is the binary code of ``j``, most significant bit first."""
    m = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
    j = torch.arange(num_experts, device=device).unsqueeze(1)
    shifts = torch.arange(m - 1, -1, -1, device=device)
    return ((j >> shifts) & 1).bool()


@ROUTERS.register(
    "dselect",
    paper="https://arxiv.org/abs/2106.03760",
    summary="DSelect-k: smooth-step binary-encoding gate, exactly <= k experts once saturated",
)
class DSelectKRouter(Router):
    """DSelect-k gate over ``num_experts`` experts with at most ``k`` non-zeros once saturated.

    Args:
        dim, num_experts, k: input width, n, number of selectors (the cardinality bound).
        gamma: smooth-step band width (> 0); routing stays soft while ``|z| < gamma/2``.
        conditioning: ``"example"`` (per-example gate, ``z = x W_z + b_z``) or ``"task"`` (static).

    The decision holds only experts with non-zero weight (``sparse_decision``), so ``MoE(...,
    combine="sparse")`` runs at most ``k`` experts per token once saturated, and exactly the
    non-zero ones before. ``aux`` (unweighted): ``"entropy_reg"`` = mean over tokens of the summed
    selector entropies; when ``n`` is not a power of two also ``"unreachable"`` = mean over tokens of
    ``sum_i 1 / (sum_j r_ij + 1e-6)``, which keeps selector mass off the codes ``>= n``.
    Initialisation as published: ``z`` weights and bias ~ U(-gamma/100, gamma/100), mixing ~ U(-0.05, 0.05).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 2,
        *,
        gamma: float = 1.0,
        conditioning: str = "example",
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, k, check_finite=check_finite)
        self.gamma = check_gamma(gamma)
        self.conditioning = check_choice("conditioning", conditioning, CONDITIONINGS)
        self.register_buffer("codes", binary_codes(num_experts, device), persistent=False)
        m = self.codes.shape[1]
        self.num_bits = m
        kw = {"device": device, "dtype": dtype}
        width = self.gamma / 100
        if conditioning == "example":
            self.z_proj = nn.Linear(dim, k * m, **kw)
            self.w_proj = nn.Linear(dim, k, **kw)
            for p, bound in (
                (self.z_proj.weight, width),
                (self.z_proj.bias, width),
                (self.w_proj.weight, 0.05),
                (self.w_proj.bias, 0.05),
            ):
                nn.init.uniform_(p, -bound, bound)
        else:
            self.z_logits = nn.Parameter(torch.empty(k, m, **kw).uniform_(-width, width))
            self.w_logits = nn.Parameter(torch.empty(k, **kw).uniform_(-0.05, 0.05))

    def selector_logits(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` ``[T, k, m]`` and mixing logits ``alpha`` ``[T, k]`` in fp32."""
        T = x_TD.shape[0]
        if self.conditioning == "task":
            z = self.z_logits.float().expand(T, -1, -1)
            return z, self.w_logits.float().expand(T, -1)
        x = x_TD.float()
        z = torch.nn.functional.linear(x, self.z_proj.weight.float(), self.z_proj.bias.float())
        alpha = torch.nn.functional.linear(x, self.w_proj.weight.float(), self.w_proj.bias.float())
        return z.reshape(T, self.k, self.num_bits), alpha

    def selector_outputs(self, z_TKM: Tensor) -> Tensor:
        """``r`` ``[T, k, n]``: each selector's distribution over the n reachable codes."""
        s = smooth_step(z_TKM, self.gamma).unsqueeze(2)  # [T, k, 1, m]
        return torch.where(self.codes, s, 1 - s).prod(-1)

    def is_saturated(self, x_TD: Tensor) -> Tensor:
        """Bool ``[T]``: every selector logit of the token is outside the band (routing is hard)."""
        z, _ = self.selector_logits(x_TD)
        return (z.abs() >= self.gamma / 2).flatten(1).all(-1)

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        z, alpha = self.selector_logits(x_TD)
        if self.check_finite:
            check_finite(z, self.layer_name)
        r = self.selector_outputs(z)
        gates = (torch.softmax(alpha, dim=-1).unsqueeze(-1) * r).sum(1)  # [T, n]
        aux = {"entropy_reg": selector_entropy(r).sum() / max(x_TD.shape[0], 1)}  # 0 on no token
        if self.num_experts != 2**self.num_bits:
            aux["unreachable"] = (1.0 / (r.sum(-1) + 1e-6)).sum() / max(x_TD.shape[0], 1)
        return sparse_decision(gates, self.k, probs_TE=gates, aux=aux)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, conditioning={self.conditioning!r}"
