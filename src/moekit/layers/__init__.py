"""MoE layers."""

from .moe import MoE, flatten_meta
from .remap import RemappedMoE, remap_decision

__all__ = ["MoE", "flatten_meta", "RemappedMoE", "remap_decision"]
