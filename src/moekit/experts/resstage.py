"""E narrow ResNet stages as one image expert bank: the experts of ResBlock-MoE (Pavlitska et al.,
https://arxiv.org/abs/2204.10598). A token is a whole feature map ``[C, H, W]``; parameters are stacked
``[E, ...]`` and BatchNorm statistics are kept per expert ``[E, C]``."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .conv import ImageExpertBank

__all__ = ["ResStageExperts", "stage_macs"]

_BN_EPS, _BN_MOMENTUM = 1e-5, 0.1


def _conv_specs(in_ch: int, hidden: int, out_ch: int, stride: int) -> list[tuple[str, int, int, int, int]]:
    """``(name, in, out, kernel, stride)`` of every conv of a narrow stage: two BasicBlocks
    ``in -> hidden`` (stride) and ``hidden -> out``, each with a 1x1 shortcut when its shape changes."""
    specs = [("b0_conv1", in_ch, hidden, 3, stride), ("b0_conv2", hidden, hidden, 3, 1)]
    if stride != 1 or in_ch != hidden:
        specs.append(("b0_short", in_ch, hidden, 1, stride))
    specs += [("b1_conv1", hidden, hidden, 3, 1), ("b1_conv2", hidden, out_ch, 3, 1)]
    if hidden != out_ch:
        specs.append(("b1_short", hidden, out_ch, 1, 1))
    return specs


def stage_macs(in_channels: int, hidden_channels: int, out_channels: int, stride: int, height: int, width: int) -> int:
    """Multiply-accumulates of one narrow stage (``ResStageExperts`` expert) on one ``H x W`` image
    (convolutions only; BatchNorm and ReLU are negligible)."""
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    specs = _conv_specs(in_channels, hidden_channels, out_channels, stride)
    return sum(cin * cout * k * k * out_h * out_w for _, cin, cout, k, _ in specs)  # every conv outputs H/s x W/s


class ResStageExperts(ImageExpertBank):
    """E narrow ResNet stages: ``BasicBlock(in -> hidden, stride) -> BasicBlock(hidden -> out)``; the
    second block's last conv projects back to the stage width (its 1x1 shortcut too), so every other
    conv stays ``hidden`` wide.

    Parameters are stacked: ``<conv>_weight [E, out, in, k, k]``, ``<conv>_bn_weight/_bn_bias [E, out]``;
    BatchNorm running statistics are buffers ``<conv>_bn_mean/_bn_var [E, out]``, so each expert
    normalises with the statistics of the images it received. Tokens are whole images ``[C, H, W]``.
    """

    token_input = False

    def __init__(
        self,
        num_experts: int,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        *,
        stride: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, in_channels, out_channels)
        self.hidden_channels = check_int("hidden_channels", hidden_channels, low=1)
        self.stride = check_int("stride", stride, low=1)
        self.specs = _conv_specs(in_channels, hidden_channels, out_channels, stride)
        E, kw = self.num_experts, {"device": device, "dtype": dtype}
        for name, cin, cout, k, _ in self.specs:
            weight = nn.Parameter(torch.empty(E, cout, cin, k, k, **kw))
            for e in range(E):
                nn.init.kaiming_normal_(weight.data[e], mode="fan_out", nonlinearity="relu")
            setattr(self, f"{name}_weight", weight)
            setattr(self, f"{name}_bn_weight", nn.Parameter(torch.ones(E, cout, **kw)))
            setattr(self, f"{name}_bn_bias", nn.Parameter(torch.zeros(E, cout, **kw)))
            self.register_buffer(f"{name}_bn_mean", torch.zeros(E, cout, **kw))
            self.register_buffer(f"{name}_bn_var", torch.ones(E, cout, **kw))

    def _conv_bn(self, x: Tensor, params: Mapping[str, Tensor], name: str, e: int, k: int, s: int) -> Tensor:
        y = F.conv2d(x, params[f"{name}_weight"][e], stride=s, padding=k // 2)
        # batch statistics need more than one value per channel: an expert that got a single 1x1
        # feature map in a training step normalises it with its running statistics instead
        batch_stats = self.training and y.shape[0] * y.shape[2] * y.shape[3] > 1
        return F.batch_norm(
            y,
            getattr(self, f"{name}_bn_mean")[e],
            getattr(self, f"{name}_bn_var")[e],
            params[f"{name}_bn_weight"][e],
            params[f"{name}_bn_bias"][e],
            training=batch_stats,
            momentum=_BN_MOMENTUM,
            eps=_BN_EPS,
        )

    def _run(self, x: Tensor, params: Mapping[str, Tensor], e: int) -> Tensor:
        spec = {name: (k, s) for name, _, _, k, s in self.specs}
        for block in ("b0", "b1"):
            h = F.relu(self._conv_bn(x, params, f"{block}_conv1", e, *spec[f"{block}_conv1"]))
            h = self._conv_bn(h, params, f"{block}_conv2", e, *spec[f"{block}_conv2"])
            short = f"{block}_short"
            x = F.relu(h + (self._conv_bn(x, params, short, e, *spec[short]) if short in spec else x))
        return x

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        """Expert g on its ``sizes_G[g]`` consecutive images (groups must be the E experts: each
        expert's BatchNorm statistics belong to it)."""
        if sizes_G.shape[0] != self.num_experts:
            raise ValueError(
                f"ResStageExperts runs groups = its {self.num_experts} experts (per-expert BatchNorm), "
                f"got {sizes_G.shape[0]} groups"
            )
        outs = [
            self._run(chunk, params, e) for e, chunk in enumerate(torch.split(x_N, sizes_G.tolist())) if chunk.shape[0]
        ]
        if outs:
            return torch.cat(outs)
        h, w = ((n - 1) // self.stride + 1 for n in x_N.shape[-2:])
        return x_N.new_zeros(0, self.out_dim, h, w)

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        return self._run(x_N, self.stacked_parameters(), e)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_channels={self.hidden_channels}, stride={self.stride}"
