"""HunYuan-MoE-V1 (``model_type="hunyuan_v1_moe"``): ``HunYuanMoEV1Moe`` = ``gate``
(``HunYuanMoEV1Gate``: its ``wg`` Linear in fp32, softmax over E, top-k renormalised) + fused SwiGLU
``experts`` + ``shared_mlp`` (ungated, never touched). Experts per token in ``config.moe_topk``, which
may be a list (one per layer: each gate keeps its own ``top_k``). Expert count in ``config.num_experts``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...merging.weights import RoutingSpec
from .base import pretrained_modules, register_family
from .fused import FusedTopKFamily

__all__ = ["HunYuanMoeV1Family"]


@register_family
class HunYuanMoeV1Family(FusedTopKFamily):
    name = "hunyuan_v1_moe"
    model_types = ("hunyuan_v1_moe",)
    experts_key = "num_experts"
    top_k_key = "moe_topk"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe import HunYuanMoEV1Moe

        return (HunYuanMoEV1Moe,)

    def router_linear(self, router: nn.Module) -> nn.Module:
        return router.wg

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(score="softmax", top_k=int(self.router(block).top_k))

    def top_k(self, config: Any) -> int:
        k = getattr(config, self.top_k_key)
        return max(k) if isinstance(k, (list, tuple)) else int(k)

    def set_num_experts(self, model: nn.Module, num_experts: int) -> None:
        for module in pretrained_modules(model):
            setattr(module.config, self.experts_key, num_experts)
            k = getattr(module.config, self.top_k_key)
            k = [min(int(v), num_experts) for v in k] if isinstance(k, (list, tuple)) else min(int(k), num_experts)
            setattr(module.config, self.top_k_key, k)
