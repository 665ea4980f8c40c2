"""Dominant experts: how many experts each layer keeps, and which.

M-SMoE (Li et al., ICLR 2024, https://arxiv.org/abs/2310.01334, Sec. 3.1 and Alg. 1) keeps the most
frequently activated experts of each layer. With a *global* budget the normalised activation
frequencies of all layers compete for one pool of slots, so layers get different counts; each
layer's most-used expert always survives. A uniform per-layer count is the ablation (paper Table 3).
"""

from __future__ import annotations

from typing import Collection, Hashable, Mapping, TypeVar

import torch
from torch import Tensor

from .._checks import check_int

__all__ = ["allocate_experts", "dominant_experts", "check_frequency"]

L = TypeVar("L", bound=Hashable)


def check_frequency(name: str, frequency_E: Tensor, num_experts: int | None = None) -> Tensor:
    """Validate an activation-frequency vector ``[E]`` (non-negative, finite, not all zero) -> fp64 CPU."""
    if not isinstance(frequency_E, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [E], got {type(frequency_E).__name__}")
    if frequency_E.dim() != 1 or (num_experts is not None and frequency_E.shape[0] != num_experts):
        want = "[E]" if num_experts is None else f"[{num_experts}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(frequency_E.shape)}")
    f = frequency_E.detach().to("cpu", torch.float64)
    if not torch.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {f.tolist()}")
    if f.sum() <= 0:
        raise ValueError(
            f"{name} is all zero: the calibration data never reached this layer "
            "(no token was routed to any of its experts)"
        )
    return f


def dominant_experts(frequency_E: Tensor, num_groups: int) -> Tensor:
    """The ``num_groups`` most frequently activated experts, as sorted original ids ``[G]`` (int64).

    Ties are broken towards the lower expert id, so the choice is deterministic.
    """
    f = check_frequency("frequency_E", frequency_E)
    check_int("num_groups", num_groups, low=1, high=f.shape[0])
    # stable sort on -f keeps lower ids first among equal frequencies
    order = torch.sort(-f, stable=True).indices
    return order[:num_groups].sort().values


def allocate_experts(
    frequencies: Mapping[L, Tensor],
    total: int | None = None,
    per_layer: int | None = None,
    exclude: Collection[L] = (),
) -> dict[L, int]:
    """How many experts each layer keeps.

    Args:
        frequencies: ``{layer: frequency_E}`` activation counts or frequencies per layer (any scale).
        total: global budget -- the number of experts kept over all *non-excluded* layers together
            (e.g. ``average * num_layers``). Frequencies are normalised to sum to 1 in each layer and
            the ``total`` largest values over all layers survive; each layer's most-used expert always
            survives (M-SMoE's adaptive ratio). Ties are broken by layer order, then expert id.
        per_layer: uniform alternative: every non-excluded layer keeps this many experts.
        exclude: layers that are not merged: they keep all their experts and use none of ``total``.

    Returns:
        ``{layer: kept count}`` for every layer of ``frequencies`` (excluded layers: their E).

    Exactly one of ``total`` and ``per_layer`` must be given.
    """
    if (total is None) == (per_layer is None):
        raise ValueError(f"give exactly one of total and per_layer, got total={total!r}, per_layer={per_layer!r}")
    if not frequencies:
        raise ValueError("frequencies is empty: no MoE layer was observed on the calibration data")
    unknown = [name for name in exclude if name not in frequencies]
    if unknown:
        raise ValueError(f"exclude names layers that are not in frequencies: {unknown}; layers: {list(frequencies)}")
    excluded = set(exclude)
    merged = [name for name in frequencies if name not in excluded]
    out: dict[L, int] = {name: int(frequencies[name].shape[0]) for name in frequencies}
    if not merged:
        return out
    freq = {name: check_frequency(f"frequencies[{name!r}]", frequencies[name]) for name in merged}
    if per_layer is not None:
        smallest = min(f.shape[0] for f in freq.values())
        check_int("per_layer", per_layer, low=1, high=smallest)
        out.update({name: per_layer for name in merged})
        return out
    capacity = sum(f.shape[0] for f in freq.values())
    check_int("total", total, low=len(merged), high=capacity)
    assert total is not None
    scores = []
    for name in merged:
        s = freq[name] / freq[name].sum()
        s[int(torch.argmax(s))] = float("inf")  # the most-used expert of every layer survives
        scores.append(s)
    flat = torch.cat(scores)
    layer_of = torch.cat([torch.full((s.shape[0],), i) for i, s in enumerate(scores)])
    keep = torch.sort(-flat, stable=True).indices[:total]
    counts = torch.bincount(layer_of[keep], minlength=len(merged))
    out.update({name: int(counts[i]) for i, name in enumerate(merged)})
    return out
