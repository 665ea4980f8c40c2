"""Phi-MoE (``model_type="phimoe"``): ``PhimoeSparseMoeBlock`` = ``router`` (``PhimoeTopKRouter``, an
``nn.Linear`` without bias; SparseMixer top-2, https://arxiv.org/abs/2409.12136 -- in eval the first
expert is the argmax and its gate the softmax over the logits within a ``jitter_eps`` margin, then the
same for the second) + fused SwiGLU ``experts``. Expert count in ``config.num_local_experts``. Merging
treats the scores as a softmax over all E (the plain-form fold); SparseMixer's gates then follow from
the merged logits.
"""

from __future__ import annotations

from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["PhimoeFamily"]


@register_family
class PhimoeFamily(FusedTopKFamily):
    name = "phimoe"
    model_types = ("phimoe",)
    experts_key = "num_local_experts"
    router_attr = "router"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

        return (PhimoeSparseMoeBlock,)
