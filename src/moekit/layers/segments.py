"""Causal segment routing for decoder language models (Lory, Zhong et al. 2024, https://arxiv.org/abs/2405.03133).

The sequence is split into segments of ``segment_len`` positions. Segment k runs one expert merged
(SMEAR-style) with routing computed from the *mean hidden state of segment k-1*, so a segment's
expert never depends on its own or later tokens. The first segment has no predecessor:

* ``first_segment="self"`` (Lory): it routes on its own mean with a stop-gradient on the routing.
  Positions of the first segment then see their own segment's mean -- causal across segments, not
  within the first one (Lory's choice for training).
* ``first_segment="uniform"``: it uses the plain average of the experts. Strictly causal: no
  position's output depends on any later position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..experts.base import ExpertBank
from ..routers.base import Router
from ..types import MoEOutput

__all__ = ["CausalSegmentMoE"]


class CausalSegmentMoE(nn.Module):
    """Merged-expert layer routed per causal segment.

    Input ``[B, L, D]``; output ``MoEOutput`` with ``y [B, L, out_dim]`` and a decision with one row
    per (example, segment), ``B * ceil(L / segment_len)`` rows.
    """

    def __init__(self, router: Router, experts: ExpertBank, *, segment_len: int, first_segment: str = "self") -> None:
        super().__init__()
        if router.is_sparse:
            raise ValueError(f"router must be dense (its weights are merged), got sparse {type(router).__name__}")
        if router.num_experts != experts.num_experts or router.dim != experts.dim:
            raise ValueError("router and experts must agree on num_experts and dim")
        if not experts.token_input:
            raise ValueError("causal segment routing needs a token expert bank (mlp, glu, adapter)")
        self.router = router
        self.experts = experts
        self.segment_len = check_int("segment_len", segment_len, low=1)
        self.first_segment = check_choice("first_segment", first_segment, ("self", "uniform"))

    def forward(self, x_BLD: Tensor) -> MoEOutput:
        if x_BLD.dim() != 3 or x_BLD.shape[-1] != self.experts.dim:
            raise ValueError(f"input must be [B, L, {self.experts.dim}], got shape {tuple(x_BLD.shape)}")
        B, L, D = x_BLD.shape
        if L == 0:
            raise ValueError("cannot route an empty sequence (L=0)")
        T = self.segment_len
        n = math.ceil(L / T)
        lengths = torch.tensor([min(T, L - k * T) for k in range(n)], device=x_BLD.device)
        padded = torch.nn.functional.pad(x_BLD, (0, 0, 0, n * T - L))
        means_BnD = padded.reshape(B, n, T, D).sum(2) / lengths.to(x_BLD.dtype).unsqueeze(-1)
        route_in = torch.cat([means_BnD[:, :1], means_BnD[:, :-1]], dim=1).reshape(B * n, D)
        decision = self.router(route_in)
        probs = decision.gates_TE().reshape(B, n, -1)
        first = probs[:, :1].detach() if self.first_segment == "self" else torch.full_like(probs[:, :1], 1 / probs.shape[-1])
        probs = torch.cat([first, probs[:, 1:]], dim=1).reshape(B * n, -1)
        merged = self.experts.merge_parameters(probs)
        y = self.experts.grouped_forward(x_BLD.reshape(B * L, D), merged, lengths.repeat(B))
        return MoEOutput(y=y.reshape(B, L, -1), aux=dict(decision.aux), decision=decision)

    def extra_repr(self) -> str:
        return f"segment_len={self.segment_len}, first_segment={self.first_segment!r}"
