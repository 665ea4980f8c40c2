"""GPT-OSS (``model_type="gpt_oss"``): ``GptOssMLP`` = ``router`` (``GptOssTopKRouter``: a Linear **with
bias**, top-k on the logits, softmax over the k) + ``experts`` (``GptOssExperts``) in the transposed
layout with biases and interleaved gate/up columns:

* ``gate_up_proj [E, D, 2F]`` (column ``2j`` = gate j, ``2j+1`` = up j) + ``gate_up_proj_bias [E, 2F]``;
* ``down_proj [E, F, D]`` + ``down_proj_bias [E, D]``;
* clamped SwiGLU ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, l)``
  (``config.swiglu_limit``, ``swiglu_alpha``).

moekit's layout is ``gate_up_proj [E, 2F, D]`` with the gate rows first, ``up_bias [E, 2F]`` in the same
order, ``down_proj [E, D, F]``, ``down_bias [E, D]``; reading de-interleaves, writing interleaves back.
The router bias makes padding experts unreachable (``--pad``). The clamped SwiGLU has no moekit bank,
so the low-rank step (``--rank``) is not offered. Expert count in ``config.num_local_experts``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...merging.weights import RoutingSpec
from .base import RemappedRouter, register_family
from .fused import FusedTopKFamily

__all__ = ["GptOssFamily"]


def _interleave(a_GXF: Tensor, b_GXF: Tensor) -> Tensor:
    """``[..., F]`` gate and up -> ``[..., 2F]`` with gate j at ``2j`` and up j at ``2j+1``."""
    return torch.stack((a_GXF, b_GXF), dim=-1).flatten(-2)


@register_family
class GptOssFamily(FusedTopKFamily):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    experts_key = "num_local_experts"
    router_attr = "router"
    compressible = False

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        return (GptOssMLP,)

    def _experts(self, block: nn.Module) -> nn.Module:
        return block.experts

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(score="topk_softmax", top_k=int(self.router(block).top_k), selection_bias="router_bias")

    def activation(self, config: Any) -> str:
        return "gpt_oss_swiglu"

    def activation_params(self, config: Any) -> dict[str, float]:
        return {"limit": float(config.swiglu_limit), "alpha": float(config.swiglu_alpha)}

    def read_experts(self, block: nn.Module) -> dict[str, Tensor]:
        e = block.experts
        w = e.gate_up_proj.detach().transpose(1, 2)  # [E, 2F, D], rows interleaved
        b = e.gate_up_proj_bias.detach()
        return {
            "gate_up_proj": torch.cat((w[:, 0::2], w[:, 1::2]), dim=1),
            "up_bias": torch.cat((b[:, 0::2], b[:, 1::2]), dim=1),
            "down_proj": e.down_proj.detach().transpose(1, 2),
            "down_bias": e.down_proj_bias.detach(),
        }

    def resize_experts(self, block: nn.Module, num_experts: int) -> None:
        e = block.experts
        for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            old = getattr(e, n)
            setattr(e, n, nn.Parameter(old.detach()[:num_experts].clone(), requires_grad=old.requires_grad))
        e.num_experts = num_experts

    def copy_experts(self, block: nn.Module, params: dict[str, Tensor]) -> None:
        e = block.experts
        w, b = params["gate_up_proj"], params["up_bias"]
        F = w.shape[1] // 2
        e.gate_up_proj.copy_(_interleave(w[:, :F].transpose(1, 2), w[:, F:].transpose(1, 2)))
        e.gate_up_proj_bias.copy_(_interleave(b[:, :F], b[:, F:]))
        e.down_proj.copy_(params["down_proj"].transpose(1, 2))
        e.down_proj_bias.copy_(params["down_bias"])

    def read_router(self, block: nn.Module) -> tuple[Tensor, Tensor | None]:
        router = self.router(block)
        return router.weight.detach(), router.bias.detach()

    def write_router(self, block: nn.Module, weight_GD: Tensor, bias_G: Tensor | None) -> None:
        router = block.router
        if isinstance(router, RemappedRouter):
            raise ValueError("cannot write a plain router into an exact-form (remapped) block")
        if bias_G is None:
            raise ValueError("gpt_oss routers have a bias; the merged router needs one")
        G = weight_GD.shape[0]
        for name, value in (("weight", weight_GD), ("bias", bias_G)):
            old = getattr(router, name)
            setattr(router, name, nn.Parameter(value.detach().to(old.device, old.dtype).clone(), requires_grad=old.requires_grad))
        router.num_experts, router.top_k = G, min(router.top_k, G)
