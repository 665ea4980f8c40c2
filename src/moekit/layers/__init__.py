"""MoE layers."""

from .adapters import (
    adapter_context,
    adapter_sites,
    insert_routed_adapters,
    load_adapters,
    remove_adapters,
    save_adapters,
)
from .dispatchers import DenseMix, Dispatcher, SparseDispatch
from .features import ExampleFeatures, Features, RoutedInput, TokenFeatures
from .baselines import ROUTED_METHODS, OutputEnsemble, SingleExpert, build_routed_block
from .example_routed import ExampleRoutedMoE
from .moe import MoE, flatten_meta
from .pooling import masked_mean
from .segments import causal_segment_groups
from .smear import SMEAR, MergeDispatch, merged_forward, merged_forward_chunked
from .remap import RemappedMoE, remap_decision
from .cnn_moe import ConvMoE, ImageMoE, ResBlockMoE, ResStageExperts

__all__ = [
    "MoE",
    "flatten_meta",
    "Features",
    "TokenFeatures",
    "ExampleFeatures",
    "RoutedInput",
    "Dispatcher",
    "SparseDispatch",
    "DenseMix",
    "MergeDispatch",
    "ExampleRoutedMoE",
    "SMEAR",
    "merged_forward",
    "merged_forward_chunked",
    "masked_mean",
    "causal_segment_groups",
    "ROUTED_METHODS",
    "SingleExpert",
    "OutputEnsemble",
    "build_routed_block",
    "insert_routed_adapters",
    "adapter_context",
    "adapter_sites",
    "remove_adapters",
    "save_adapters",
    "load_adapters",
    "RemappedMoE",
    "remap_decision",
    "ImageMoE",
    "ResBlockMoE",
    "ConvMoE",
    "ResStageExperts",
]
