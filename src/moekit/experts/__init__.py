"""Expert banks with stacked parameters, and sparse dispatch."""

from .adapter import AdapterExperts
from .base import ExpertBank
from .conv import ConvExperts
from .dispatch import combine_dense, dispatch, dispatch_reference, plan_dispatch
from .grouped import grouped_linear, grouped_linear_reference
from .huge_pages import to_huge_pages
from .inference import dispatch_inference, linears_for_inference, pack_for_inference
from .lowrank import LowRankSparseExperts
from .mlp import GLUExperts, MLPExperts
from .packed import PackedLowRankSparseExperts
from .resstage import ResStageExperts

__all__ = [
    "ExpertBank",
    "MLPExperts",
    "GLUExperts",
    "AdapterExperts",
    "ConvExperts",
    "ResStageExperts",
    "LowRankSparseExperts",
    "PackedLowRankSparseExperts",
    "dispatch",
    "dispatch_reference",
    "combine_dense",
    "plan_dispatch",
    "grouped_linear",
    "grouped_linear_reference",
    "dispatch_inference",
    "pack_for_inference",
    "linears_for_inference",
    "to_huge_pages",
]
