"""Qwen2-MoE (``model_type="qwen2_moe"``): ``Qwen2MoeSparseMoeBlock`` = ``gate`` (top-k softmax router)
+ fused SwiGLU ``experts`` + a dense ``shared_expert`` with a sigmoid ``shared_expert_gate`` that every
token uses. Only the routed experts are merged; the shared expert is left as it is. Expert count in
``config.num_experts``; layers in ``config.mlp_only_layers`` (or off ``decoder_sparse_step``) are dense
and are not MoE blocks.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["Qwen2MoeFamily"]


@register_family
class Qwen2MoeFamily(FusedTopKFamily):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    experts_key = "num_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        return (Qwen2MoeSparseMoeBlock,)
