"""Balancing losses: pure functions of a RoutingDecision returning an fp32 scalar.

Coefficients belong to the training config, not here. Statistics use the population variance
(CV = std/mean over experts with ``correction=0``), as in Shazeer et al. and the CNN-MoE paper.
Every loss is 0 (finite, and still differentiable) on a decision with no token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import LOSSES
from .types import RoutingDecision

__all__ = ["cv_squared", "importance_cv2", "load_cv2", "switch_aux", "z_loss", "kl_to_uniform", "entropy"]

_EPS = 1e-10


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation ``Var(x)/Mean(x)^2`` over experts (0 for E=1)."""
    x_E = x_E.float()
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    return x_E.var(correction=0) / (x_E.mean() ** 2 + _EPS)


def _need(decision: RoutingDecision, field: str, loss: str) -> Tensor:
    value = getattr(decision, field)
    if value is None:
        raise ValueError(f"loss {loss!r} needs decision.{field}, which this router does not provide")
    return value


@LOSSES.register("importance", paper="https://arxiv.org/abs/1701.06538")
def importance_cv2(decision: RoutingDecision) -> Tensor:
    """CV² of importance ``Imp_e = sum_t G_te`` with G the post-top-k gate weights (Shazeer 2017, eq. 6)."""
    return cv_squared(decision.gates_TE().float().sum(0))


@LOSSES.register("load", paper="https://arxiv.org/abs/1701.06538")
def load_cv2(decision: RoutingDecision) -> Tensor:
    """CV² of load. Differentiable with noisy top-k (smooth ``P(x, i)``, Shazeer appendix A);
    otherwise CV² of the hard token counts (no gradient)."""
    if decision.load_prob_TE is not None:
        return cv_squared(decision.load_prob_TE.sum(0))
    return cv_squared(decision.counts())


@LOSSES.register("switch", paper="https://arxiv.org/abs/2101.03961")
def switch_aux(decision: RoutingDecision) -> Tensor:
    """Switch/GShard aux loss ``E * sum_e f_e * P_e``: f_e = slots assigned to e per token (all k
    choices, before capacity drops), P_e = mean router probability. Equals transformers'
    ``load_balancing_loss_func`` for Mixtral-style routers on the same logits."""
    probs = _need(decision, "probs_TE", "switch").float()
    T = max(decision.num_tokens, 1)
    f = torch.bincount(decision.ids_TK.reshape(-1), minlength=decision.num_experts).float() / T
    return decision.num_experts * (f * probs.sum(0) / T).sum()


@LOSSES.register("z", paper="https://arxiv.org/abs/2202.08906")
def z_loss(decision: RoutingDecision) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``."""
    logits = _need(decision, "logits_TE", "z").float()
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / max(decision.num_tokens, 1)


@LOSSES.register("kl_uniform", paper="https://arxiv.org/abs/2204.10598")
def kl_to_uniform(decision: RoutingDecision) -> Tensor:
    """``KL(p || U_E) = log E - H(p)`` where ``p = Imp / T`` is the batch-mean post-top-k gate
    (renormalised to sum to one when capacity dropped slots)."""
    gates = decision.gates_TE().float()
    if decision.num_tokens == 0:
        return gates.sum()
    p = gates.mean(0)
    p = p / p.sum().clamp_min(_EPS)
    return math.log(decision.num_experts) + (p * torch.log(p.clamp_min(_EPS))).sum()


@LOSSES.register("entropy", paper="https://arxiv.org/abs/2106.03760")
def entropy(decision: RoutingDecision) -> Tensor:
    """Mean per-token entropy of the router distribution (``probs_TE``, else the gates).
    Adding it with a positive coefficient pushes routing towards confident (sparse) choices."""
    p = decision.probs_TE if decision.probs_TE is not None else decision.gates_TE()
    p = p.float()
    return -(p * torch.log(p.clamp_min(_EPS))).sum() / max(decision.num_tokens, 1)
