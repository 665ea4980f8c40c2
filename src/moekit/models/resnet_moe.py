"""CIFAR-style ResNet-18 with one stage turned into a Mixture of Experts (Pavlitska et al.,
https://arxiv.org/abs/2204.10598).

``conv3x3 stem (stride 1) -> 4 stages of 2 BasicBlocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2)
-> GAP -> linear``. ``moe_position`` p in 1..4 replaces stage p by a ``ResBlockMoE`` (E narrow
copies of the stage, ``moe_type="resblock"``) or turns every conv of its two blocks into a
``ConvMoE`` (``moe_type="conv"``); ``moe_position=None`` is the dense baseline.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_k
from ..balancing import BALANCERS, create_balancer
from ..layers.cnn_moe import GATES, ConvMoE, ResBlockMoE
from ..registry import MODELS
from ..types import MoEOutput

__all__ = ["ResNetMoE", "BasicBlock", "ConvMoEBlock", "MOE_TYPES"]

MOE_TYPES = ("resblock", "conv")
POSITIONS = (1, 2, 3, 4)


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(out_ch, **kw)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(out_ch, **kw)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, **kw), nn.BatchNorm2d(out_ch, **kw)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ConvMoEBlock(nn.Module):
    """A BasicBlock whose two convs are ``ConvMoE`` layers (each with its own per-image gate)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        moe_kwargs: Mapping[str, Any],
        make_balancer: Any,
        kw: dict[str, Any],
    ) -> None:
        super().__init__()
        self.conv1 = ConvMoE(in_ch, out_ch, stride=stride, balancer=make_balancer(), **moe_kwargs, **kw)
        self.bn1 = nn.BatchNorm2d(out_ch, **kw)
        self.conv2 = ConvMoE(out_ch, out_ch, balancer=make_balancer(), **moe_kwargs, **kw)
        self.bn2 = nn.BatchNorm2d(out_ch, **kw)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, **kw), nn.BatchNorm2d(out_ch, **kw)
            )

    def forward(self, x: Tensor, meta: Mapping[str, Any] | None = None) -> tuple[Tensor, list[MoEOutput]]:
        first = self.conv1(x, meta=meta)
        second = self.conv2(F.relu(self.bn1(first.y)), meta=meta)
        return F.relu(self.bn2(second.y) + self.shortcut(x)), [first, second]


@MODELS.register("resnet_moe", paper="https://arxiv.org/abs/2204.10598", summary="CIFAR ResNet-18 with an MoE stage")
class ResNetMoE(nn.Module):
    """CIFAR-style ResNet-18 with an optional MoE stage.

    ``forward(x [N, C, H, W], meta=None)`` returns ``(logits [N, classes], [MoEOutput per MoE layer])``.

    Args:
        num_classes, in_channels: output classes and image channels.
        width: stem / first-stage width w (the original ResNet-18: 64).
        moe_position: stage 1..4 to replace, or None for the dense network.
        moe_type: ``"resblock"`` (ResBlock-MoE) or ``"conv"`` (Conv-MoE in both blocks of the stage).
        num_experts, k: E and experts per image.
        expert_ratio: ResBlock-MoE expert inner width as a fraction of the stage width (paper ~0.39).
        residual: ResBlock-MoE adds the stage's shortcut around the mixture.
        gate, gate_channels: ``"gap"`` (GAP-FC) or ``"conv"`` (conv-GAP, default width = stage output width).
        noisy: learned gate noise in training (Shazeer).
        balancer, balancer_kwargs: ``"relative"``, ``"mean"`` (hard constraints, kwarg ``tau``) or
            ``"aux_free"`` (kwarg ``rate``), one per MoE layer; None for no balancer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        width: int = 64,
        moe_position: int | None = None,
        moe_type: str = "resblock",
        num_experts: int = 4,
        k: int = 2,
        expert_ratio: float = 0.39,
        residual: bool = True,
        gate: str = "gap",
        gate_channels: int | None = None,
        noisy: bool = True,
        balancer: str | None = None,
        balancer_kwargs: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if moe_position is not None and moe_position not in POSITIONS:
            raise ValueError(
                f"moe_position must be one of {list(POSITIONS)} (or None for the dense ResNet-18), got {moe_position!r}"
            )
        if not 0 < expert_ratio <= 4:
            raise ValueError(f"expert_ratio must be in (0, 4], got {expert_ratio}")
        self._config = {
            "num_classes": check_int("num_classes", num_classes, low=2),
            "in_channels": check_int("in_channels", in_channels, low=1),
            "width": check_int("width", width, low=1),
            "moe_position": moe_position,
            "moe_type": check_choice("moe_type", moe_type, MOE_TYPES),
            "num_experts": check_int("num_experts", num_experts, low=1),
            "k": check_k(k, num_experts),
            "expert_ratio": float(expert_ratio),
            "residual": bool(residual),
            "gate": check_choice("gate", gate, GATES),
            "gate_channels": gate_channels,
            "noisy": bool(noisy),
            "balancer": None if balancer is None else check_choice("balancer", balancer, BALANCERS),
            "balancer_kwargs": dict(balancer_kwargs or {}),
        }
        kw = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(width, **kw), nn.ReLU()
        )
        stages, in_ch = [], width
        for position in POSITIONS:
            out_ch, stride = width * 2 ** (position - 1), 1 if position == 1 else 2
            stages.append(self._stage(position, in_ch, out_ch, stride, kw))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(in_ch, num_classes, **kw)

    def _stage(self, position: int, in_ch: int, out_ch: int, stride: int, kw: dict[str, Any]) -> nn.Module:
        c = self._config
        if position != c["moe_position"]:
            return nn.Sequential(BasicBlock(in_ch, out_ch, stride, **kw), BasicBlock(out_ch, out_ch, **kw))

        def make_balancer() -> Any:
            if c["balancer"] is None:
                return None
            return create_balancer(c["balancer"], c["num_experts"], k=c["k"], **c["balancer_kwargs"])

        gate_channels = c["gate_channels"] or out_ch
        moe_kwargs = {
            "num_experts": c["num_experts"],
            "k": c["k"],
            "gate": c["gate"],
            "gate_channels": gate_channels,
            "noisy": c["noisy"],
        }
        if c["moe_type"] == "conv":
            return nn.ModuleList(
                [
                    ConvMoEBlock(in_ch, out_ch, stride, moe_kwargs, make_balancer, kw),
                    ConvMoEBlock(out_ch, out_ch, 1, moe_kwargs, make_balancer, kw),
                ]
            )
        hidden = max(1, round(c["expert_ratio"] * out_ch))
        return ResBlockMoE(
            in_ch,
            out_ch,
            hidden_channels=hidden,
            stride=stride,
            residual=c["residual"],
            balancer=make_balancer(),
            **moe_kwargs,
            **kw,
        )

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-serialisable; used by checkpoints)."""
        return {key: (dict(v) if isinstance(v, Mapping) else v) for key, v in self._config.items()}

    def forward(self, x: Tensor, meta: Mapping[str, Any] | None = None) -> tuple[Tensor, list[MoEOutput]]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"images must be [N, C={self.in_channels}, H, W], got shape {tuple(x.shape)}")
        h, outputs = self.stem(x), []
        for stage in self.stages:
            if isinstance(stage, ResBlockMoE):
                out = stage(h, meta=meta)
                h = out.y
                outputs.append(out)
            elif isinstance(stage, nn.ModuleList):
                for block in stage:
                    h, outs = block(h, meta)
                    outputs.extend(outs)
            else:
                h = stage(h)
        return self.head(h.mean(dim=(2, 3))), outputs
