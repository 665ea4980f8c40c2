"""Hugging Face transformers integration: read/write experts and routers of MoE families, record
their routing, merge their experts (M-SMoE) and save/load the smaller checkpoints.

Families (``config.model_type``): mixtral, qwen2_moe, qwen3_moe, olmoe, switch_transformers -- one adapter file
each; adding a family is one small file (a ``MoEFamily`` subclass with ``@register_family``) and one
import line below. Needs transformers >= 5 (fused 3D expert tensors). See docs/huggingface.md.
"""

from . import mixtral, olmoe, qwen2_moe, qwen3_moe, switch  # noqa: F401  (registers the families)
from .base import FAMILIES, MoEFamily, RemappedRouter, family_for, list_families, register_family
from .io import load_hf_model, save_hf_model
from .merge import MERGE_CONFIG_KEY, merge_hf_model
from .routing import routing_sources
from .stack import DecoderStack, hf_stack

__all__ = [
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
]
