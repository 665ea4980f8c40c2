"""Token-choice top-k routers: noisy top-k (Shazeer et al. 2017) and Switch top-1 (Fedus et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..balancing import Balancer
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import LinearScorer, Meta, Router
from .capacity import apply_capacity, check_capacity_factor

__all__ = ["TopKRouter", "SwitchRouter", "smooth_load_probability"]


def smooth_load_probability(clean_TE: Tensor, noisy_TE: Tensor, std_TE: Tensor, k: int) -> Tensor:
    """Shazeer's P(x, i): probability that expert i stays in the top-k when only its own noise is
    resampled -- ``Phi((clean_i - threshold_i) / std_i)``, where the threshold is the k-th largest
    noisy logit of the *other* experts. Differentiable in the clean logits and the noise std."""
    E = noisy_TE.shape[-1]
    top = noisy_TE.topk(min(k + 1, E), dim=-1).values
    kth = top[:, k - 1 : k]  # threshold for experts outside the top-k
    if k < E:
        kth_plus_one = top[:, k : k + 1]  # threshold for experts inside the top-k
        inside = noisy_TE >= kth
        threshold = torch.where(inside, kth_plus_one, kth)
    else:
        return torch.ones_like(clean_TE)
    # the standard normal CDF; unlike torch.distributions it does not validate its input, so NaN/inf
    # logits reach the router's finiteness check (a FloatingPointError naming the layer)
    return torch.special.ndtr((clean_TE - threshold) / std_TE)


@ROUTERS.register("topk", paper="https://arxiv.org/abs/1701.06538", summary="noisy top-k gating (Shazeer 2017)")
class TopKRouter(Router):
    """Top-k gating with optional learned noise.

    ``logits = x W_g``; in training with ``noisy=True``, ``noisy = logits + N(0,1) * softplus(x W_noise)``.
    The k largest (balancer-adjusted) logits are kept; weights are the softmax over the kept logits
    (``renormalize=True``, Shazeer / Mixtral) or the full-softmax probabilities of the kept experts
    (``renormalize=False``, Switch / Qwen ``norm_topk_prob=False``).

    Args:
        dim, num_experts, k: input width, E, experts per token.
        noisy: learned softplus noise during training.
        renormalize: see above.
        capacity_factor: per-expert capacity as a multiple of ``T*k/E``; None = dropless.
        balancer: optional selection-only balancer (e.g. ``AuxFreeBias``).
        expert_dropout: in training, each expert is unavailable to a token with this probability
            (its probability zeroed and the rest renormalised before selection, as SMEAR's official
            top-k baseline; a token keeps at least k experts).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 2,
        *,
        noisy: bool = True,
        renormalize: bool = True,
        capacity_factor: float | None = None,
        balancer: Balancer | None = None,
        expert_dropout: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, k, balancer=balancer, check_finite=check_finite)
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        self.expert_dropout = expert_dropout
        self.noisy = noisy
        self.renormalize = renormalize
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.gate = LinearScorer(dim, num_experts, device=device, dtype=dtype)
        # Shazeer initialise both gate and noise weights to zero; the gate here starts small-random
        # so that experts receive different tokens from step one.
        self.noise = LinearScorer(dim, num_experts, init_std=0.0, device=device, dtype=dtype) if noisy else None

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        clean = self.gate(x_TD)
        logits, load_prob = clean, None
        if self.noise is not None and self.training:
            std = F.softplus(self.noise(x_TD)) + 1e-2
            logits = clean + torch.randn_like(clean) * std
            load_prob = smooth_load_probability(clean, logits, std, self.k)
        available = self._drop_experts(logits) if self.training and self.expert_dropout > 0 else logits
        ids = self.selection_logits(available).topk(self.k, dim=-1).indices
        chosen = available.gather(1, ids)
        probs = torch.softmax(available, dim=-1)
        weights = torch.softmax(chosen, dim=-1) if self.renormalize else probs.gather(1, ids)
        decision = RoutingDecision(
            ids_TK=ids,
            weights_TK=weights,
            num_experts=self.num_experts,
            logits_TE=logits,
            probs_TE=probs,
            load_prob_TE=load_prob,
        )
        return apply_capacity(decision, self.capacity_factor)

    def _drop_experts(self, logits_TE: Tensor) -> Tensor:
        """Logits with dropped experts at -inf (softmax = zeroed, renormalised probabilities); a token
        left with fewer than k experts keeps all of them."""
        keep = torch.rand_like(logits_TE) >= self.expert_dropout
        keep |= (keep.sum(-1, keepdim=True) < self.k)
        return logits_TE.masked_fill(~keep, float("-inf"))


@ROUTERS.register("switch", paper="https://arxiv.org/abs/2101.03961", summary="Switch top-1, output scaled by its probability")
class SwitchRouter(TopKRouter):
    """Switch Transformer routing: top-1, weight = the expert's softmax probability (so the router
    gets a gradient), optional multiplicative input jitter in training, capacity factor (default 1.25)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        jitter: float = 0.0,
        capacity_factor: float | None = 1.25,
        balancer: Balancer | None = None,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            dim, num_experts, 1, noisy=False, renormalize=False, capacity_factor=capacity_factor,
            balancer=balancer, check_finite=check_finite, device=device, dtype=dtype,
        )
        self.jitter = jitter

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        return super().route(x_TD, meta)
