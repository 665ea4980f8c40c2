"""Causal segment routing for decoder language models (Lory, Zhong et al. 2024, https://arxiv.org/abs/2405.03133).

SMEAR routes each example on the mean of *all* its positions, so in a decoder every position would
see its future. Lory splits the sequence into segments of ``segment_len`` positions; segment k is
routed on the (masked) mean hidden state of segment k-1, so no position's routing depends on its own
segment or later ones. The first segment has no predecessor:

* ``first_segment="self"`` (Lory's training choice): it routes on its own mean with a stop-gradient
  on the routing weights. Causal across segments, not inside the first segment.
* ``first_segment="default"``: it routes on a zero vector, i.e. a learned default routing (with
  SMEAR's router, LayerNorm(0) gives uniform routing at initialisation). Strictly causal: no
  position's output depends on any later position.

Pass ``segment_len`` to ``SMEAR`` (merged experts per segment, Lory's layer) or to any routed block of
``build_routed_block`` (sparse methods route per segment the same way). A segment that is all padding
contributes a zero mean. Merging happens once per segment, so its extra cost is about ``E / segment_len``
of the expert's FLOPs. Incremental decoding with a KV cache sees only the new tokens in each call;
run generation without a cache (``use_cache=False``) to get exactly the training-time routing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_choice, check_int
from .pooling import RoutingGroups, check_mask

__all__ = ["FIRST_SEGMENT", "segment_sizes", "causal_segment_groups"]

FIRST_SEGMENT = ("self", "default")


def segment_sizes(length: int, segment_len: int) -> list[int]:
    """Lengths of the ``ceil(length / segment_len)`` segments of a sequence (the last may be shorter)."""
    check_int("segment_len", segment_len, low=1)
    n = math.ceil(length / segment_len)
    return [min(segment_len, length - k * segment_len) for k in range(n)]


def causal_segment_groups(
    x_BLD: Tensor, mask_BL: Tensor | None, segment_len: int, first_segment: str = "self"
) -> RoutingGroups:
    """Routing groups = segments, each routed on the previous segment's masked mean.

    Args:
        x_BLD: ``[B, L, D]`` hidden states.
        mask_BL: optional padding mask (true/1 = real token); each example needs a real token.
        segment_len: positions per segment (T).
        first_segment: ``"self"`` or ``"default"`` (see the module docstring).
    Returns:
        ``RoutingGroups`` with ``B * ceil(L / T)`` groups in (example, segment) order.
    """
    check_choice("first_segment", first_segment, FIRST_SEGMENT)
    if x_BLD.dim() != 3:
        raise ValueError(f"causal segment routing needs [B, L, D], got shape {tuple(x_BLD.shape)}")
    B, L, D = x_BLD.shape
    if L == 0:
        raise ValueError(f"cannot route empty sequences: input has shape {tuple(x_BLD.shape)} (L=0)")
    sizes = segment_sizes(L, segment_len)
    n, pad = len(sizes), len(sizes) * segment_len - L
    m = check_mask(mask_BL, x_BLD)
    if m is None:
        m = x_BLD.new_ones(B, L)
    sums_BnD = F.pad(x_BLD * m.unsqueeze(-1), (0, 0, 0, pad)).reshape(B, n, segment_len, D).sum(2)
    counts_Bn = F.pad(m, (0, pad)).reshape(B, n, segment_len).sum(2)
    means_BnD = sums_BnD / counts_Bn.clamp_min(1).unsqueeze(-1)  # all-padding segment -> zeros
    first = means_BnD[:, :1] if first_segment == "self" else torch.zeros_like(means_BnD[:, :1])
    route_in = torch.cat([first, means_BnD[:, :-1]], dim=1).reshape(B * n, D)
    device = x_BLD.device
    sizes_G = torch.tensor(sizes, dtype=torch.long, device=device).repeat(B)
    example_G = torch.arange(B, device=device).repeat_interleave(n)
    stop = (torch.arange(n, device=device) == 0).repeat(B) if first_segment == "self" else None
    return RoutingGroups(route_in, sizes_G, example_G, stop)
