"""DeepSeek-V3 (``model_type="deepseek_v3"``) and the families built on its MoE block (GLM-4-MoE, dots1).

``DeepseekV3MoE`` = ``gate`` (``DeepseekV3TopkRouter``: fp32 logits, **sigmoid** scores; experts are
*chosen* on the scores plus ``e_score_correction_bias`` (a per-expert buffer of the router) within the
best ``topk_group`` of ``n_group`` groups, each group scored by the sum of its top-2 biased scores; the
gates are the *unbiased* scores of the chosen experts, renormalised if ``norm_topk_prob``, times
``routed_scaling_factor``) + fused SwiGLU ``experts`` + ``shared_experts`` (ungated dense MLP, never
merged or pruned). The first ``first_k_dense_replace`` layers are dense MLPs, not MoE blocks.

Reduction keeps each group's experts in that group (``RoutingSpec.groups``), each group at least two
experts (the top-2 group score); the plain form keeps the dominant expert's router row and
``e_score_correction_bias`` entry (a sigmoid router has no softmax mass to fold), and ``--pad`` can
make padding experts unreachable through that bias. Expert count in ``config.n_routed_experts``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...merging.weights import RoutingSpec
from ...types import RoutingDecision
from .base import register_family
from .fused import FusedTopKFamily, topk_decision

__all__ = ["DeepseekV3StyleFamily", "DeepseekV3Family"]

BIAS = "e_score_correction_bias"


class DeepseekV3StyleFamily(FusedTopKFamily):
    """Base of DeepSeek-V3-style families (a subclass sets ``name``, ``model_types``, ``block_types``)."""

    experts_key = "n_routed_experts"

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        router = self.router(block)
        groups = int(router.num_group or 1)
        return RoutingSpec(
            score="sigmoid", top_k=int(router.top_k), selection_bias=BIAS, groups=groups,
            topk_group=int(router.topk_group) if groups > 1 else 1, min_per_group=2 if groups > 1 else 1,
            scaling=float(router.routed_scaling_factor),
        )  # fmt: skip

    def read_router_extras(self, block: nn.Module) -> dict[str, Tensor]:
        return {BIAS: getattr(self.router(block), BIAS).detach()}

    def write_router_extras(self, block: nn.Module, extras: dict[str, Tensor]) -> None:
        router = self.router(block)
        old = getattr(router, BIAS)
        router.register_buffer(BIAS, extras[BIAS].detach().to(old.device, old.dtype).clone())

    def decision(self, output: Any) -> RoutingDecision:
        return topk_decision(output, score="sigmoid")


@register_family
class DeepseekV3Family(DeepseekV3StyleFamily):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        return (DeepseekV3MoE,)


