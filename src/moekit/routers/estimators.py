"""Discrete top-1 routing trained with gradient estimators: straight-through Gumbel-softmax and
REINFORCE with a learned baseline (the learned-routing baselines of SMEAR, arXiv 2306.03745)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import LinearScorer, Meta, Router

__all__ = ["STGumbelRouter", "ReinforceRouter", "reinforce_terms"]


@ROUTERS.register("st_gumbel", paper="https://arxiv.org/abs/1611.01144", summary="top-1 straight-through Gumbel-softmax")
class STGumbelRouter(Router):
    """Top-1 with the straight-through Gumbel-softmax estimator (Jang et al. 2017).

    Training: ``p = softmax((logits + Gumbel) / tau)``, the forward uses the argmax expert with
    weight ``1 - p_i.detach() + p_i`` (= 1 in value, gradient of ``p_i``). ``tau`` anneals as
    ``max(tau_min, tau_start * exp(-decay * step))``, one step per training forward; the step lives in
    a buffer so the schedule survives save/load. Evaluation: argmax, weight 1.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        tau_start: float = 10.0,
        tau_min: float = 0.5,
        decay: float = 1e-4,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, 1, check_finite=check_finite)
        self.tau_start = check_positive("tau_start", tau_start)
        self.tau_min = check_positive("tau_min", tau_min)
        self.decay = check_positive("decay", decay, allow_zero=True)
        self.gate = LinearScorer(dim, num_experts, device=device, dtype=dtype)
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))

    @property
    def temperature(self) -> float:
        return max(self.tau_min, self.tau_start * math.exp(-self.decay * int(self.step)))

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        logits = self.gate(x_TD)
        probs = torch.softmax(logits, dim=-1)
        if self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-20, 1.0)))
            soft = torch.softmax((logits + gumbel) / self.temperature, dim=-1)
            ids = soft.argmax(-1, keepdim=True)
            p = soft.gather(1, ids)
            weights = 1.0 - p.detach() + p
            self.step += 1
        else:
            ids = logits.argmax(-1, keepdim=True)
            weights = torch.ones_like(ids, dtype=logits.dtype)
        return RoutingDecision(ids_TK=ids, weights_TK=weights, num_experts=self.num_experts, logits_TE=logits, probs_TE=probs)


@ROUTERS.register("reinforce", paper="https://doi.org/10.1007/BF00992696", summary="top-1 sampled, REINFORCE with learned baseline")
class ReinforceRouter(Router):
    """Top-1 routing trained with REINFORCE (Williams 1992) and a learned baseline.

    Training samples ``e ~ Categorical(softmax(logits))`` and runs it with weight 1 (no gradient
    reaches the router through the output). The decision's ``extras`` carry the per-token
    ``log_prob`` of the sample and the ``baseline`` prediction (an MLP ``d -> d/8 -> 1`` on the
    detached router input); pass them with the per-example task loss to ``reinforce_terms``.
    Evaluation: argmax. Entropy sign convention: ``reinforce_terms`` returns the entropy as ``+H``;
    adding ``+c * H`` to the loss (the official SMEAR code, c = 5e-4) *penalises* entropy, ``-c * H``
    rewards exploration.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, 1, check_finite=check_finite)
        self.gate = LinearScorer(dim, num_experts, device=device, dtype=dtype)
        hidden = max(1, dim // 8)
        kw = {"device": device, "dtype": dtype}
        self.baseline = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, 1, **kw))

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        logits = self.gate(x_TD)
        probs = torch.softmax(logits, dim=-1)
        extras: dict[str, Tensor] = {}
        if self.training:
            ids = torch.multinomial(probs.detach(), 1)
            extras = {
                "log_prob": torch.log_softmax(logits, -1).gather(1, ids).squeeze(1),
                "baseline": self.baseline(x_TD.detach().to(self.baseline[0].weight.dtype)).squeeze(1).float(),
                "entropy": -(probs * torch.log_softmax(logits, -1)).sum(-1),
            }
        else:
            ids = logits.argmax(-1, keepdim=True)
        weights = torch.ones_like(ids, dtype=logits.dtype)
        return RoutingDecision(
            ids_TK=ids, weights_TK=weights, num_experts=self.num_experts, logits_TE=logits, probs_TE=probs, extras=extras
        )


def reinforce_terms(decision: RoutingDecision, loss_T: Tensor) -> dict[str, Tensor]:
    """REINFORCE terms for a training decision and the per-token (per-example) task loss ``[T]``.

    Returns unweighted scalars:
      * ``policy``: ``mean((loss - baseline).detach() * log_prob)`` -- minimising it lowers the
        probability of choices that did worse than the baseline;
      * ``value``: Huber(delta=1) between the baseline and the detached loss (trains the baseline);
      * ``entropy``: mean routing entropy. Sign convention: it is returned as +H, so a *positive*
        coefficient penalises entropy (what the official SMEAR code does, coefficient 5e-4) and a
        negative one rewards exploration.
    """
    if "log_prob" not in decision.extras:
        raise ValueError("decision has no REINFORCE extras: it must come from a ReinforceRouter in training mode")
    if loss_T.shape != decision.extras["log_prob"].shape:
        raise ValueError(f"loss_T must have shape {tuple(decision.extras['log_prob'].shape)}, got {tuple(loss_T.shape)}")
    loss_T = loss_T.detach().float()
    baseline = decision.extras["baseline"]
    advantage = loss_T - baseline.detach()
    return {
        "policy": (advantage * decision.extras["log_prob"]).mean(),
        "value": F.huber_loss(baseline, loss_T, delta=1.0),
        "entropy": decision.extras["entropy"].mean(),
    }
