"""What a per-example router sees: routing groups and the pooled input of each group.

A *routing group* is a run of consecutive positions of one example that share one routing decision:
the whole example (SMEAR, https://arxiv.org/abs/2306.03745) or one causal segment of it (Lory,
https://arxiv.org/abs/2405.03133; see ``segments.py``). Groups index the rows of the flattened input
``[B * S, D]`` in order, so ``sizes_G`` alone says which rows belong to which group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RoutingGroups", "masked_mean", "example_groups", "check_mask"]


class RoutingGroups(NamedTuple):
    """Routing input and extent of G groups.

    Attributes:
        route_in_GD: what the router sees for each group, ``[G, D]``.
        sizes_G: positions per group (consecutive rows of the flattened input), int64 ``[G]``.
        example_G: the example each group belongs to, int64 ``[G]`` (to expand per-example metadata).
        stop_grad_G: bool ``[G]``: groups whose routing weights get a stop-gradient, or ``None``.
    """

    route_in_GD: Tensor
    sizes_G: Tensor
    example_G: Tensor
    stop_grad_G: Tensor | None = None


def check_mask(mask_BS: Tensor | None, x_BSD: Tensor) -> Tensor | None:
    """Validate a padding mask (true/1 = real position) for ``[B, S, ...]`` and return it as a float
    tensor; raise on a wrong shape and on examples that are all padding."""
    if mask_BS is None:
        return None
    if not isinstance(mask_BS, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask_BS).__name__}")
    if tuple(mask_BS.shape) != tuple(x_BSD.shape[:2]):
        raise ValueError(
            f"mask must have shape {tuple(x_BSD.shape[:2])} (batch, positions), got {tuple(mask_BS.shape)}"
        )
    m = (mask_BS != 0).to(x_BSD.dtype)
    empty = m.sum(1) == 0
    if bool(empty.any()):
        bad = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"examples {bad[:10]} have an all-padding mask; there is nothing to route on")
    return m


class _PositionMean(torch.autograd.Function):
    """``x.mean(1)`` whose backward hands back ``grad / S`` broadcast over positions (a stride-0 view):
    autograd's ``MeanBackward`` materialises a full ``[B, S, D]`` quotient, which then only gets added to
    the input's other gradient (one full-size pass saved per step, measured in ``bench_smear.py``)."""

    @staticmethod
    def forward(ctx, x_BSD: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x_BSD.shape
        return x_BSD.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_BD: Tensor) -> Tensor:  # type: ignore[override]
        B, S, D = ctx.shape
        return (grad_BD / S).unsqueeze(1).expand(B, S, D)


def masked_mean(x_BSD: Tensor, mask_BS: Tensor | None = None) -> Tensor:
    """Mean over positions of ``[B, S, D]`` counting only positions where ``mask`` is true/1: ``[B, D]``.

    (The official SMEAR code averages padding in; moekit does not.) Raises on empty sequences and on
    examples whose mask is all padding.
    """
    if x_BSD.dim() != 3:
        raise ValueError(f"masked_mean needs [B, S, D], got shape {tuple(x_BSD.shape)}")
    if x_BSD.shape[1] == 0:
        raise ValueError(f"cannot route empty sequences: input has shape {tuple(x_BSD.shape)} (S=0)")
    m = check_mask(mask_BS, x_BSD)
    if m is None:
        return _PositionMean.apply(x_BSD)
    return (x_BSD * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)


def example_groups(x_BSD: Tensor, mask_BS: Tensor | None = None) -> RoutingGroups:
    """One group per example, routed on its masked mean (SMEAR)."""
    B, S = x_BSD.shape[:2]
    pooled = masked_mean(x_BSD, mask_BS)
    sizes = torch.full((B,), S, dtype=torch.long, device=x_BSD.device)
    return RoutingGroups(pooled, sizes, torch.arange(B, device=x_BSD.device))
