"""MoE layers."""

from .moe import MoE, flatten_meta

__all__ = ["MoE", "flatten_meta"]
