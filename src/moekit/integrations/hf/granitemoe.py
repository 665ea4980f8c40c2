"""Granite-MoE (``model_type`` ``granitemoe``, ``granitemoeshared``, ``granitemoehybrid``):
``<Family>MoE`` (``block_sparse_moe``) = ``router`` (``<Family>TopKRouter``: top-k on the logits,
softmax over the k) + fused SwiGLU ``experts``. The shared MLP of granitemoeshared / hybrid
(``shared_mlp``) sits in the decoder layer, outside the block, and is never touched. Expert count in
``config.num_local_experts``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...merging.weights import RoutingSpec
from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["GraniteMoeFamily"]

_BLOCKS = {
    "granitemoe": ("granitemoe", "GraniteMoeMoE"),
    "granitemoeshared": ("granitemoeshared", "GraniteMoeSharedMoE"),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridMoE"),
}


@register_family
class GraniteMoeFamily(FusedTopKFamily):
    name = "granitemoe"
    model_types = tuple(_BLOCKS)
    experts_key = "num_local_experts"
    router_attr = "router"

    def block_types(self) -> tuple[type, ...]:
        import importlib

        out = []
        for module, cls in _BLOCKS.values():
            out.append(getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls))
        return tuple(out)

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(score="topk_softmax", top_k=int(self.router(block).top_k))
