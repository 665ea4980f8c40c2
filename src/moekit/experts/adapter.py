"""Bottleneck adapter experts (Houlsby et al. 2019): ``up(act(down(x)))`` -- the residual is added
by the caller (the adapter site), so the bank stays a pure function of its input."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..registry import EXPERTS
from .base import ExpertBank, activation_fn, init_stacked_linear
from .grouped import grouped_linear
from .merged_linear import merged_linear

__all__ = ["AdapterExperts"]


@EXPERTS.register("adapter", paper="https://arxiv.org/abs/1902.00751")
class AdapterExperts(ExpertBank):
    """E bottleneck adapters with ``down_proj [E, B, D]`` and ``up_proj [E, D, B]``.

    ``up_init_scale`` scales the up projection's init; adapters usually start close to zero so the
    wrapped model starts at its pretrained function.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        bottleneck: int,
        *,
        activation: str = "relu",
        up_init_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, dim)
        self.bottleneck = check_int("bottleneck", bottleneck, low=1)
        self.activation = activation
        self._act = activation_fn(activation)
        kw = {"device": device, "dtype": dtype}
        E, D, B = self.num_experts, self.dim, self.bottleneck
        self.down_proj = nn.Parameter(torch.empty(E, B, D, **kw))
        self.down_bias = nn.Parameter(torch.empty(E, B, **kw))
        self.up_proj = nn.Parameter(torch.empty(E, D, B, **kw))
        self.up_bias = nn.Parameter(torch.empty(E, D, **kw))
        init_stacked_linear(self.down_proj, self.down_bias)
        init_stacked_linear(self.up_proj, self.up_bias)
        with torch.no_grad():
            self.up_proj.mul_(up_init_scale)
            self.up_bias.mul_(up_init_scale)

    def activate(self, h: Tensor) -> Tensor:
        """The bottleneck activation, ``[..., B] -> [..., B]``."""
        return self._act(h)

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        h = self.activate(grouped_linear(x_N, params["down_proj"], sizes_G, params["down_bias"]))
        return grouped_linear(h, params["up_proj"], sizes_G, params["up_bias"])

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        h = self.activate(F.linear(x_N, self.down_proj[e], self.down_bias[e]))
        return F.linear(h, self.up_proj[e], self.up_bias[e])

    def forward_merged(self, x_GSI: Tensor, probs_GE: Tensor, *, chunk_bytes: int) -> Tensor:
        h = self.activate(merged_linear(x_GSI, probs_GE, self.down_proj, self.down_bias, chunk_bytes=chunk_bytes))
        return merged_linear(h, probs_GE, self.up_proj, self.up_bias, chunk_bytes=chunk_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bottleneck={self.bottleneck}, activation={self.activation!r}"
