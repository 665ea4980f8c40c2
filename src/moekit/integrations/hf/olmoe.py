"""OLMoE (``model_type="olmoe"``): ``OlmoeSparseMoeBlock`` = ``gate`` (top-k softmax router,
top-k weights renormalised only if ``norm_topk_prob``) + fused SwiGLU ``experts``; expert count in
``config.num_experts``.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["OlmoeFamily"]


@register_family
class OlmoeFamily(FusedTopKFamily):
    name = "olmoe"
    model_types = ("olmoe",)
    experts_key = "num_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        return (OlmoeSparseMoeBlock,)
