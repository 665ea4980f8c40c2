"""``NoviceExperts``: a bank whose last experts are MoNE novices (Zhang et al., ICLR 2026,
https://arxiv.org/abs/2507.00390): each returns one constant vector, the mean output of the pruned
expert it stands for, whatever its input.

The bank holds G real experts (any token bank) followed by N novices, so the layer's dispatcher
multiplies a novice's constant by the gate of every token routed to it -- exactly where the pruned
expert answered before. An exact-form layer (router unchanged, ``expert_map``) sends the pruned
experts' router outputs to the novice slots ``G .. G+N-1``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import ExpertBank

__all__ = ["NoviceExperts"]


class NoviceExperts(ExpertBank):
    """``experts`` (G real experts, trained as usual) followed by ``novices [N, out_dim]`` (a buffer).

    ``num_experts`` is G + N; ``stacked_parameters`` are the real experts' (novices are not trained).
    """

    def __init__(self, experts: ExpertBank, novices_ND: Tensor) -> None:
        if not experts.token_input:
            raise ValueError("novices need a token-level expert bank")
        if novices_ND.dim() != 2 or novices_ND.shape[1] != experts.out_dim:
            raise ValueError(f"novices must be [N, out_dim={experts.out_dim}], got {tuple(novices_ND.shape)}")
        super().__init__(experts.num_experts + novices_ND.shape[0], experts.dim, experts.out_dim)
        self.experts = experts
        self.register_buffer("novices", novices_ND.detach().clone())

    @property
    def real_experts(self) -> int:
        """G, the experts that compute."""
        return self.experts.num_experts

    def stacked_parameters(self) -> dict[str, Tensor]:
        return self.experts.stacked_parameters()

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        G = self.real_experts
        real = int(sizes_G[:G].sum())
        y = self.experts.grouped_forward(x_N[:real], params, sizes_G[:G])
        constant = self.novices.to(y.dtype).repeat_interleave(sizes_G[G:].to(self.novices.device), dim=0)
        return torch.cat([y, constant])

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        G = self.real_experts
        if e < G:
            return self.experts.expert_forward(x_N, e)
        return self.novices[e - G].to(x_N.dtype).expand(x_N.shape[0], -1)

    def extra_repr(self) -> str:
        return f"real_experts={self.real_experts}, novices={self.novices.shape[0]}"
