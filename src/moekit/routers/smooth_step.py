"""The smooth-step activation and the exactly sparse routing decisions it makes possible.

``S_gamma(t)`` (Hazimeh et al. 2020, https://arxiv.org/abs/2002.07772) is a C^1 cubic that reaches
exact 0 and 1 outside the band ``|t| < gamma/2``. DSelect-k and COMET build their gates from it, so
their expert weights become *exactly* zero once the splits saturate. ``sparse_decision`` turns such
weights into a routing decision that holds only the experts with non-zero weight, so sparse dispatch
runs only those.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_positive
from ..types import RoutingDecision

__all__ = ["smooth_step", "check_gamma", "sparse_decision", "selector_entropy"]

#: inside-log offset of the entropy regularisers (as in the official DSelect-k / COMET code)
ENTROPY_EPS = 1e-6


def check_gamma(gamma: float) -> float:
    """``gamma`` must be a positive finite number."""
    gamma = check_positive("gamma", gamma)
    if gamma == float("inf"):
        raise ValueError(f"gamma must be finite and > 0, got {gamma}")
    return gamma


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """``0`` if ``t <= -gamma/2``, ``1`` if ``t >= gamma/2``, else ``-2t^3/gamma^3 + 3t/(2 gamma) + 1/2``.

    Values are exact at and beyond the band edges; the derivative is 0 there (the cubic's slope at
    ``+-gamma/2`` is 0), so saturated inputs get no gradient.
    """
    half = gamma / 2
    tc = t.clamp(-half, half)
    cubic = -2.0 * tc**3 / gamma**3 + 1.5 * tc / gamma + 0.5
    return torch.where(t <= -half, torch.zeros_like(cubic), torch.where(t >= half, torch.ones_like(cubic), cubic))


def selector_entropy(p: Tensor) -> Tensor:
    """``-sum_j p_j log(p_j + 1e-6)`` over the last axis (finite, 0 for one-hot rows)."""
    return -(p * torch.log(p + ENTROPY_EPS)).sum(-1)


def sparse_decision(gates_TE: Tensor, k: int, **fields: object) -> RoutingDecision:
    """A decision holding exactly the experts with non-zero weight in ``gates_TE``.

    ``K = max(k, most non-zeros of any token)``: once the gate is saturated every token has at most
    ``k`` non-zeros and ``K == k``; before that, tokens with more non-zeros keep them all, so what
    sparse dispatch runs is exactly what the gate uses. Slots beyond a token's non-zeros carry
    weight 0 and ``kept_TK=False``, so dispatch skips them. Weights are gathered from ``gates_TE``
    (gradients flow to the gate). ``fields`` go to ``RoutingDecision`` (``probs_TE``, ``aux``, ...).
    """
    T, E = gates_TE.shape
    nonzero = int((gates_TE != 0).sum(-1).max()) if T else 0  # one host sync: K is data dependent
    K = min(E, max(k, nonzero))
    weights_TK, ids_TK = gates_TE.topk(K, dim=-1)
    return RoutingDecision(
        ids_TK=ids_TK,
        weights_TK=weights_TK,
        num_experts=E,
        kept_TK=weights_TK != 0,
        **fields,  # type: ignore[arg-type]
    )
