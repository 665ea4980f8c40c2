"""2D convolution experts: each expert one ``Conv2d``; a token is a whole image ``[C, H, W]``
(per-image routing, as in MoE layers for CNNs). The router sees the global-average-pooled image."""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..registry import EXPERTS
from .base import ExpertBank

__all__ = ["ImageExpertBank", "ConvExperts"]


class ImageExpertBank(ExpertBank):
    """A bank whose token is a whole image ``[C, H, W]``: inputs ``[N, C, H, W]`` route per image,
    and the router sees the global average pool ``[N, C]``."""

    def as_tokens(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"input must be [N, C={self.dim}, H, W], got shape {tuple(x.shape)}")
        return x

    def restore(self, y_T: Tensor, x: Tensor) -> Tensor:
        return y_T

    def router_features(self, x_T: Tensor) -> Tensor:
        return x_T.mean(dim=(2, 3))


@EXPERTS.register("conv", paper="https://arxiv.org/abs/1701.06538")
class ConvExperts(ImageExpertBank):
    """E convolutions with ``weight [E, C_out, C_in, k, k]`` and ``bias [E, C_out]``.

    Grouped execution: when every group has the same number of images (SMEAR's one image per
    group, dense ensembles), the groups are folded into the channel axis and run as one grouped
    ``conv2d``; otherwise one ``conv2d`` per non-empty group.
    """

    token_input = False

    def __init__(
        self,
        num_experts: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, in_channels, out_channels)
        self.kernel_size = check_int("kernel_size", kernel_size, low=1)
        self.stride = check_int("stride", stride, low=1)
        self.padding = kernel_size // 2 if padding is None else check_int("padding", padding, low=0)
        kw = {"device": device, "dtype": dtype}
        E, k = self.num_experts, self.kernel_size
        self.weight = nn.Parameter(torch.empty(E, out_channels, in_channels, k, k, **kw))
        self.bias = nn.Parameter(torch.empty(E, out_channels, **kw)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * k * k)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int = 1) -> Tensor:
        return F.conv2d(x, w, b, stride=self.stride, padding=self.padding, groups=groups)

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        w, b = params["weight"], params.get("bias")
        G = sizes_G.shape[0]
        if x_N.shape[0] > 0 and bool((sizes_G == sizes_G[0]).all()):
            s = x_N.shape[0] // G
            x_folded = x_N.reshape(G, s, *x_N.shape[1:]).transpose(0, 1).reshape(s, G * self.dim, *x_N.shape[2:])
            y = self._conv(x_folded, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), groups=G)
            return y.reshape(s, G, self.out_dim, *y.shape[2:]).transpose(0, 1).reshape(G * s, self.out_dim, *y.shape[2:])
        outs = []
        for g, chunk in enumerate(torch.split(x_N, sizes_G.tolist())):
            if chunk.shape[0]:
                outs.append(self._conv(chunk, w[g], None if b is None else b[g]))
        if outs:
            return torch.cat(outs)
        return self._conv(x_N, w[0], None if b is None else b[0])  # no image: [0, C_out, H', W'], still on the graph

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        return self._conv(x_N, self.weight[e], None if self.bias is None else self.bias[e])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, stride={self.stride}"
