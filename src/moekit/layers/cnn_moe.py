"""MoE layers inside CNNs, routed per image (Pavlitska et al., https://arxiv.org/abs/2204.10598).

* ``ResBlockMoE``: a ResNet stage (two BasicBlocks) replaced by E narrower copies of it; the whole
  feature map of an image goes to its top-k experts, optionally plus the stage's shortcut ("residual").
* ``ConvMoE``: one conv layer replaced by E convs (``ConvExperts``).

Both are ``ImageMoE``: a gate turns the feature map into a vector (``GAPGate``: global average
pooling, the paper's GAP-FC gate together with the router's linear map; ``ConvGAPGate``:
conv3x3 -> ReLU -> GAP), a moekit router (default: Shazeer's noisy top-k, learned noise in training)
picks experts per image, and ``dispatch`` runs each expert only on the images routed to it.

The E narrow stages of ``ResStageExperts`` (``moekit.experts.resstage``) keep stacked parameters
``[E, ...]`` and per-expert BatchNorm statistics ``[E, C]``; grouped execution runs one expert's
convolutions on its images only. Both layers are ``moekit.MoE`` with a gate and, for ResBlock-MoE's
residual variant, a shortcut.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_k
from ..balancing import Balancer
from ..experts.base import ExpertBank
from ..experts.conv import ConvExperts
from ..experts.resstage import ResStageExperts, stage_macs
from ..routers.base import Router
from ..routers.topk import TopKRouter
from .moe import MoE

__all__ = ["GAPGate", "ConvGAPGate", "ResStageExperts", "ImageMoE", "ResBlockMoE", "ConvMoE", "stage_macs", "GATES"]

GATES = ("gap", "conv")


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
