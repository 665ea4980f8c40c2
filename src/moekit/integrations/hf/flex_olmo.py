"""FlexOlmo (``model_type="flex_olmo"``): OLMoE's block (``FlexOlmoSparseMoeBlock``: ``gate`` top-k
softmax router, renormalised only if ``norm_topk_prob``; fused SwiGLU ``experts``). Expert count in
``config.num_experts``.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["FlexOlmoFamily"]


@register_family
class FlexOlmoFamily(FusedTopKFamily):
    name = "flex_olmo"
    model_types = ("flex_olmo",)
    experts_key = "num_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock

        return (FlexOlmoSparseMoeBlock,)
