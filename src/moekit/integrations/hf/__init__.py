"""Hugging Face transformers integration: read/write experts and routers of MoE families, record
their routing, merge their experts (M-SMoE) and save/load the smaller checkpoints.

Families (``config.model_type``): mixtral, minimax, qwen2_moe, qwen3_moe, olmoe, flex_olmo, deepseek_v2,
deepseek_v3, glm4_moe, dots1, gpt_oss, granitemoe (+shared, hybrid), phimoe, ernie4_5_moe, hunyuan_v1_moe,
switch_transformers -- one adapter file each (docs/huggingface.md has the table of what works for each);
adding a family is one small file (a ``MoEFamily`` subclass with ``@register_family``) and one
import line below. Needs transformers >= 5 (fused 3D expert tensors). See docs/huggingface.md.

Importing this package also registers moekit's dispatch as the transformers experts implementations
``"moekit"`` and ``"moekit_packed"`` (``experts_impl.py``): ``from_pretrained(..., experts_implementation="moekit")``.
``replace_routers(model, "comet" | "dselect" | "topk", ...)`` (``replace.py``) swaps a model's routers for
moekit routers and balancers, to fine-tune it in a normal transformers loop.
"""

from . import (  # noqa: F401  (registers the families)
    deepseek_v2,
    deepseek_v3,
    dots1,
    ernie4_5_moe,
    flex_olmo,
    glm4_moe,
    gpt_oss,
    granitemoe,
    hunyuan_v1_moe,
    kind,
    minimax,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    switch,
)
from .experts_impl import register_experts_implementation
from .base import FAMILIES, MoEFamily, RemappedRouter, family_for, list_families, register_family
from .io import load_hf_model, save_hf_model
from .merge import MERGE_CONFIG_KEY, merge_hf_model
from .moekit_only import mark_moekit_only
from .replace import MoekitGate, replace_routers
from .routing import routing_sources
from .stack import DecoderStack, hf_stack

register_experts_implementation()  # experts_implementation="moekit" / "moekit_packed" in transformers

__all__ = [
    "register_experts_implementation",
    "MoEFamily",
    "RemappedRouter",
    "FAMILIES",
    "register_family",
    "family_for",
    "list_families",
    "routing_sources",
    "DecoderStack",
    "hf_stack",
    "merge_hf_model",
    "MERGE_CONFIG_KEY",
    "save_hf_model",
    "load_hf_model",
    "mark_moekit_only",
    "replace_routers",
    "MoekitGate",
]
