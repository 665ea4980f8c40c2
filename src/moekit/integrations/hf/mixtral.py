"""Mixtral (``model_type="mixtral"``): ``MixtralSparseMoeBlock`` = ``gate`` (top-k softmax router,
renormalised top-k weights) + fused SwiGLU ``experts``; expert count in ``config.num_local_experts``.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["MixtralFamily"]


@register_family
class MixtralFamily(FusedTopKFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    experts_key = "num_local_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        return (MixtralSparseMoeBlock,)
