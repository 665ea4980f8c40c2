"""Qwen3-MoE (``model_type="qwen3_moe"``): ``Qwen3MoeSparseMoeBlock`` = ``gate`` (top-k softmax router,
top-k weights renormalised if ``norm_topk_prob``) + fused SwiGLU ``experts``, no shared expert. Expert
count in ``config.num_experts``; layers in ``config.mlp_only_layers`` are dense.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["Qwen3MoeFamily"]


@register_family
class Qwen3MoeFamily(FusedTopKFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    experts_key = "num_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        return (Qwen3MoeSparseMoeBlock,)
