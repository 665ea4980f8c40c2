"""moekit: Mixture-of-Experts layers, routers, balancing, analysis and merging for PyTorch."""

from . import losses
from .balancing import AuxFreeBias, Balancer
from .experts import AdapterExperts, ConvExperts, ExpertBank, GLUExperts, MLPExperts, dispatch, dispatch_reference
from .layers import (
    SMEAR,
    ExampleRoutedMoE,
    MoE,
    OutputEnsemble,
    SingleExpert,
    adapter_context,
    adapter_sites,
    build_routed_block,
    insert_routed_adapters,
    load_adapters,
    remove_adapters,
    save_adapters,
)
from .registry import (
    create_experts,
    create_router,
    get_loss,
    list_experts,
    list_losses,
    list_routers,
)
from .routers import (
    COMETRouter,
    DSelectKRouter,
    PermutationLocalSearch,
    ExpertChoiceRouter,
    HashRouter,
    ReinforceRouter,
    Router,
    name_routers,
    SMEARRouter,
    STGumbelRouter,
    SoftmaxRouter,
    SwitchRouter,
    TagRouter,
    TopKRouter,
    reinforce_terms,
)
from .stats import RoutingRecorder, record_routing, routing_metrics
from .types import MoEOutput, RoutingDecision
from .checkpoint import load_checkpoint, save_checkpoint
from .layers.remap import RemappedMoE
from .merging import allocate_experts, merge_layer, merge_moekit_model
from .models.lm import MoELM
from .balancing import ImportanceConstraint, MeanImportanceConstraint, RelativeImportanceConstraint, create_balancer
from .layers.cnn_moe import ConvMoE, ImageMoE, ResBlockMoE, ResStageExperts
from .models.resnet_moe import ResNetMoE
from .analysis import analyze_model, force_expert, inference_k, write_analysis_report

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "RoutingDecision",
    "MoEOutput",
    "MoE",
    "ExampleRoutedMoE",
    "SMEAR",
    "SingleExpert",
    "OutputEnsemble",
    "build_routed_block",
    "insert_routed_adapters",
    "adapter_context",
    "adapter_sites",
    "remove_adapters",
    "save_adapters",
    "load_adapters",
    "SMEARRouter",
    "STGumbelRouter",
    "ReinforceRouter",
    "reinforce_terms",
    "Router",
    "name_routers",
    "SoftmaxRouter",
    "TopKRouter",
    "DSelectKRouter",
    "COMETRouter",
    "PermutationLocalSearch",
    "SwitchRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "TagRouter",
    "Balancer",
    "AuxFreeBias",
    "ExpertBank",
    "MLPExperts",
    "GLUExperts",
    "AdapterExperts",
    "ConvExperts",
    "dispatch",
    "dispatch_reference",
    "losses",
    "RoutingRecorder",
    "record_routing",
    "routing_metrics",
    "create_router",
    "list_routers",
    "create_experts",
    "list_experts",
    "get_loss",
    "list_losses",
    "RemappedMoE",
    "MoELM",
    "ImportanceConstraint",
    "RelativeImportanceConstraint",
    "MeanImportanceConstraint",
    "create_balancer",
    "ImageMoE",
    "ResBlockMoE",
    "ConvMoE",
    "ResStageExperts",
    "ResNetMoE",
    "analyze_model",
    "write_analysis_report",
    "force_expert",
    "inference_k",
    "save_checkpoint",
    "load_checkpoint",
    "allocate_experts",
    "merge_layer",
    "merge_moekit_model",
]

# Hugging Face integration, imported on first use so that `import moekit` never imports transformers.
# (Not in __all__: `from moekit import *` must work without transformers.)
_LAZY_HF = ("routing_sources", "merge_hf_model", "load_hf_model", "save_hf_model")


def __getattr__(name: str):  # PEP 562
    if name in _LAZY_HF:
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
