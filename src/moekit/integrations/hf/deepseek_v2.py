"""DeepSeek-V2 (``model_type="deepseek_v2"``): ``DeepseekV2Moe`` = ``gate`` (``DeepseekV2TopkRouter``:
fp32 softmax over E, top-k with ``topk_method="greedy"`` or ``"group_limited_greedy"`` -- groups scored by
their best expert, the best ``topk_group`` of ``n_group`` kept -- no renormalisation, gates times
``routed_scaling_factor``) + fused SwiGLU ``experts`` + ``shared_experts`` (an ungated dense MLP, never
merged or pruned). The first ``first_k_dense_replace`` layers are dense. Expert count in
``config.n_routed_experts``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...merging.weights import RoutingSpec
from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["DeepseekV2Family"]


@register_family
class DeepseekV2Family(FusedTopKFamily):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    experts_key = "n_routed_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

        return (DeepseekV2Moe,)

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        router = self.router(block)
        grouped = router.topk_method == "group_limited_greedy" and int(router.num_group or 1) > 1
        return RoutingSpec(
            score="softmax", top_k=int(router.top_k), groups=int(router.num_group) if grouped else 1,
            topk_group=int(router.topk_group) if grouped else 1, min_per_group=1,
            scaling=float(router.routed_scaling_factor),
        )  # fmt: skip
