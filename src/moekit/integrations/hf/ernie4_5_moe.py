"""ERNIE-4.5-MoE (``model_type="ernie4_5_moe"``): ``Ernie4_5_MoeSparseMoeBlock`` = ``gate``
(``Ernie4_5_MoeTopKRouter``: fp32 softmax over E; experts *chosen* on the probabilities plus
``gate.moe_statics.e_score_correction_bias [1, E]``, gates = the unbiased probabilities renormalised,
clamped at ``moe_norm_min``) + fused SwiGLU ``experts`` + optional ``shared_experts`` (ungated, never
touched). Layers outside ``moe_layer_start_index..moe_layer_end_index`` / ``moe_layer_interval`` are
dense. Expert count in ``config.moe_num_experts``, experts per token in ``moe_k``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...merging.weights import RoutingSpec
from .base import register_family
from .fused import FusedTopKFamily

__all__ = ["Ernie45MoeFamily"]

BIAS = "e_score_correction_bias"


@register_family
class Ernie45MoeFamily(FusedTopKFamily):
    name = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
    experts_key = "moe_num_experts"
    top_k_key = "moe_k"

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

        return (Ernie4_5_MoeSparseMoeBlock,)

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(score="softmax", top_k=int(self.router(block).top_k), selection_bias=BIAS)

    def read_router_extras(self, block: nn.Module) -> dict[str, Tensor]:
        return {BIAS: getattr(self.router(block).moe_statics, BIAS).detach()[0]}

    def write_router_extras(self, block: nn.Module, extras: dict[str, Tensor]) -> None:
        statics = self.router(block).moe_statics
        old = getattr(statics, BIAS)
        new = extras[BIAS].detach().to(old.device, old.dtype).reshape(1, -1).clone()
        setattr(statics, BIAS, nn.Parameter(new, requires_grad=old.requires_grad))
