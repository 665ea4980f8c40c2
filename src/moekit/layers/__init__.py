"""MoE layers."""

from .adapters import adapter_context, adapter_sites, insert_routed_adapters, load_adapters, save_adapters
from .baselines import ROUTED_METHODS, build_routed_block
from .example_routed import ExampleRoutedMoE, masked_mean
from .moe import MoE, flatten_meta
from .segments import CausalSegmentMoE
from .remap import RemappedMoE, remap_decision

__all__ = [
    "MoE",
    "flatten_meta",
    "ExampleRoutedMoE",
    "masked_mean",
    "CausalSegmentMoE",
    "ROUTED_METHODS",
    "build_routed_block",
    "insert_routed_adapters",
    "adapter_context",
    "adapter_sites",
    "save_adapters",
    "load_adapters",
    "RemappedMoE",
    "remap_decision",
]
