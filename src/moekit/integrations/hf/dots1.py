"""dots.llm1 (``model_type="dots1"``): DeepSeek-V3's MoE block (``Dots1MoE``: sigmoid router with
``e_score_correction_bias`` and group-limited choice, ``routed_scaling_factor``, ungated shared experts),
first ``first_k_dense_replace`` layers dense. See ``deepseek_v3.py``.
"""

from __future__ import annotations

from .base import register_family
from .deepseek_v3 import DeepseekV3StyleFamily

__all__ = ["Dots1Family"]


@register_family
class Dots1Family(DeepseekV3StyleFamily):
    name = "dots1"
    model_types = ("dots1",)

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.dots1.modeling_dots1 import Dots1MoE

        return (Dots1MoE,)
