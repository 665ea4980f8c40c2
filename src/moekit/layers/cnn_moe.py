"""MoE layers inside CNNs, routed per image (Pavlitska et al., https://arxiv.org/abs/2204.10598).

* ``ResBlockMoE``: a ResNet stage (two BasicBlocks) replaced by E narrower copies of it; the whole
  feature map of an image goes to its top-k experts, optionally plus the stage's shortcut ("residual").
* ``ConvMoE``: one conv layer replaced by E convs (``ConvExperts``).

Both are ``ImageMoE``: a gate turns the feature map into a vector (``GAPGate``: global average
pooling, the paper's GAP-FC gate together with the router's linear map; ``ConvGAPGate``:
conv3x3 -> ReLU -> GAP), a moekit router (default: Shazeer's noisy top-k, learned noise in training)
picks experts per image, and ``dispatch`` runs each expert only on the images routed to it.

The E narrow stages of ``ResStageExperts`` keep stacked parameters ``[E, ...]`` and per-expert
BatchNorm statistics ``[E, C]``; grouped execution runs one expert's convolutions on its images only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_k
from ..balancing import Balancer
from ..experts.base import ExpertBank
from ..experts.conv import ConvExperts, ImageExpertBank
from ..routers.base import Router
from ..routers.topk import TopKRouter
from .moe import MoE

__all__ = ["GAPGate", "ConvGAPGate", "ResStageExperts", "ImageMoE", "ResBlockMoE", "ConvMoE", "stage_macs", "GATES"]

GATES = ("gap", "conv")
_BN_EPS, _BN_MOMENTUM = 1e-5, 0.1


class GAPGate(nn.Module):
    """Global average pooling: ``[N, C, H, W] -> [N, C]`` (with the router's linear map: GAP-FC)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_dim = check_int("channels", channels, low=1)

    def forward(self, x_NCHW: Tensor) -> Tensor:
        return x_NCHW.mean(dim=(2, 3))


class ConvGAPGate(nn.Module):
    """``conv3x3(C -> G) -> ReLU -> GAP``: ``[N, C, H, W] -> [N, G]``. The paper's ConvGate has no
    ReLU; without one, conv then GAP is close to a linear map of the GAP vector."""

    def __init__(self, channels: int, gate_channels: int = 256, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.out_dim = check_int("gate_channels", gate_channels, low=1)
        self.conv = nn.Conv2d(
            check_int("channels", channels, low=1), gate_channels, 3, padding=1, device=device, dtype=dtype
        )

    def forward(self, x_NCHW: Tensor) -> Tensor:
        return F.relu(self.conv(x_NCHW)).mean(dim=(2, 3))


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


class ImageMoE(MoE):
    """Per-image MoE over an image expert bank: ``y = sum_k w_k expert_k(x) [+ shortcut(x)]`` -- ``MoE``
    with a gate (the bank's rows -> router input) and an optional shortcut.

    Args:
        router: a moekit router over ``gate.out_dim`` features.
        experts: an image bank (``ResStageExperts``, ``ConvExperts``).
        gate: maps ``[N, C, H, W]`` to router features ``[N, D]`` (default ``GAPGate``).
        shortcut: optional module added to the mixture (the "residual" variant).
        combine: ``"sparse"`` (only chosen experts run) or ``"dense"`` (all run; oracle).
    """

    def __init__(
        self,
        router: Router,
        experts: ExpertBank,
        *,
        gate: nn.Module | None = None,
        shortcut: nn.Module | None = None,
        combine: str = "sparse",
    ) -> None:
        if experts.token_input:
            raise TypeError(f"ImageMoE needs an image expert bank, got {type(experts).__name__}")
        gate = gate if gate is not None else GAPGate(experts.dim)
        if router.dim != gate.out_dim or router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has dim={router.dim}, num_experts={router.num_experts}; gate gives {gate.out_dim} "
                f"features and the bank has {experts.num_experts} experts"
            )
        super().__init__(router, experts, combine=combine, gate=gate, shortcut=shortcut)


def _make_gate(gate: str, channels: int, gate_channels: int, kw: dict[str, Any]) -> nn.Module:
    if check_choice("gate", gate, GATES) == "conv":
        return ConvGAPGate(channels, gate_channels, **kw)
    return GAPGate(channels)


def _make_router(
    dim: int, num_experts: int, k: int, noisy: bool, balancer: Balancer | None, kw: dict[str, Any]
) -> TopKRouter:
    check_int("num_experts", num_experts, low=1)
    return TopKRouter(dim, num_experts, check_k(k, num_experts), noisy=noisy, balancer=balancer, **kw)


class ResBlockMoE(ImageMoE):
    """A ResNet stage replaced by ``num_experts`` narrow copies of it, top-k per image.

    Args:
        in_channels, out_channels, stride: those of the replaced stage.
        hidden_channels: inner width of each expert (the paper: about 0.39x / 0.35x the stage width).
        residual: add the stage's shortcut (identity, or 1x1 conv + BN when the shape changes).
        gate: ``"gap"`` (GAP-FC) or ``"conv"`` (conv3x3 -> ReLU -> GAP -> FC, ``gate_channels`` wide).
        noisy: Shazeer's learned noise on the logits in training.
        balancer: optional selection balancer (hard constraint or aux-free bias).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_experts: int = 4,
        k: int = 2,
        hidden_channels: int | None = None,
        stride: int = 1,
        residual: bool = True,
        gate: str = "gap",
        gate_channels: int = 256,
        noisy: bool = True,
        balancer: Balancer | None = None,
        combine: str = "sparse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        hidden = hidden_channels if hidden_channels is not None else max(1, math.ceil(0.39 * out_channels))
        experts = ResStageExperts(num_experts, in_channels, out_channels, hidden, stride=stride, **kw)
        gate_module = _make_gate(gate, in_channels, gate_channels, kw)
        router = _make_router(gate_module.out_dim, num_experts, k, noisy, balancer, kw)
        shortcut = _shortcut(in_channels, out_channels, stride, kw) if residual else None
        super().__init__(router, experts, gate=gate_module, shortcut=shortcut, combine=combine)


def _shortcut(in_ch: int, out_ch: int, stride: int, kw: dict[str, Any]) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, **kw), nn.BatchNorm2d(out_ch, **kw))


class ConvMoE(ImageMoE):
    """One conv layer replaced by ``num_experts`` convs (``ConvExperts``), top-k per image."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        num_experts: int = 4,
        k: int = 2,
        stride: int = 1,
        bias: bool = False,
        gate: str = "gap",
        gate_channels: int = 256,
        noisy: bool = True,
        balancer: Balancer | None = None,
        combine: str = "sparse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        experts = ConvExperts(num_experts, in_channels, out_channels, kernel_size, stride=stride, bias=bias, **kw)
        gate_module = _make_gate(gate, in_channels, gate_channels, kw)
        router = _make_router(gate_module.out_dim, num_experts, k, noisy, balancer, kw)
        super().__init__(router, experts, gate=gate_module, combine=combine)
