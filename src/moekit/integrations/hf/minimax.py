"""MiniMax (``model_type="minimax"``): ``MiniMaxSparseMoeBlock`` = Mixtral's block (``gate``: top-k
softmax router, renormalised; fused SwiGLU ``experts``) in a hybrid lightning/softmax-attention model.
Expert count in ``config.num_local_experts``.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["MiniMaxFamily"]


@register_family
class MiniMaxFamily(FusedTopKFamily):
    name = "minimax"
    model_types = ("minimax",)
    experts_key = "num_local_experts"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.minimax.modeling_minimax import MiniMaxSparseMoeBlock

        return (MiniMaxSparseMoeBlock,)
