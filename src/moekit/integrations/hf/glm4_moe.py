"""GLM-4-MoE (``model_type="glm4_moe"``): DeepSeek-V3's MoE block (``Glm4MoeMoE``: sigmoid router with
``e_score_correction_bias`` and group-limited choice, ``routed_scaling_factor``, ungated shared experts),
first ``first_k_dense_replace`` layers dense. See ``deepseek_v3.py``.
"""

from __future__ import annotations

from .base import register_family
from .deepseek_v3 import DeepseekV3StyleFamily

__all__ = ["Glm4MoeFamily"]


@register_family
class Glm4MoeFamily(DeepseekV3StyleFamily):
    name = "glm4_moe"
    model_types = ("glm4_moe",)

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

        return (Glm4MoeMoE,)
