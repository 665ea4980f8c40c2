"""moekit: Mixture-of-Experts layers, routers, balancing, analysis and merging for PyTorch.

Every public name is imported on first use (PEP 562), so ``import moekit`` costs almost nothing and
``moekit.MoE`` pays only for the modules it needs; scipy, matplotlib, scikit-learn and transformers
are imported only by the functions that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: submodule -> the public names it provides as ``moekit.<name>``
_EXPORTS: dict[str, tuple[str, ...]] = {
    "types": ("RoutingDecision", "MoEOutput"),
    "layers": (
        "MoE", "ExampleRoutedMoE", "SMEAR", "SingleExpert", "OutputEnsemble", "build_routed_block",
        "insert_routed_adapters", "adapter_context", "adapter_sites", "remove_adapters", "save_adapters",
        "load_adapters", "ImageMoE", "ResBlockMoE", "ConvMoE", "ResStageExperts", "RemappedMoE",
    ),
    "routers": (
        "SMEARRouter", "STGumbelRouter", "ReinforceRouter", "reinforce_terms", "Router", "name_routers",
        "SoftmaxRouter", "TopKRouter", "DSelectKRouter", "COMETRouter", "PermutationLocalSearch", "SwitchRouter",
        "ExpertChoiceRouter", "HashRouter", "TagRouter",
    ),
    "balancing": (
        "Balancer", "AuxFreeBias", "ImportanceConstraint", "RelativeImportanceConstraint",
        "MeanImportanceConstraint", "create_balancer",
    ),
    "experts": ("ExpertBank", "MLPExperts", "GLUExperts", "AdapterExperts", "ConvExperts", "dispatch",
                "dispatch_reference"),
    "stats": ("RoutingRecorder", "record_routing", "routing_metrics"),
    "registry": ("create_router", "list_routers", "create_experts", "list_experts", "get_loss", "list_losses",
                 "register_model"),
    "models.lm": ("MoELM",),
    "models.resnet_moe": ("ResNetMoE",),
    "analysis": ("analyze_model", "write_analysis_report", "force_expert", "inference_k"),
    "checkpoint": ("save_checkpoint", "load_checkpoint"),
    "merging": ("allocate_experts", "merge_layer", "merge_moekit_model"),
}  # fmt: skip
#: submodules reachable as attributes without an explicit import
_SUBMODULES = ("losses",)
#: Hugging Face integration (needs transformers); not in ``__all__`` so ``from moekit import *`` works without it
_HF_EXPORTS = ("routing_sources", "merge_hf_model", "load_hf_model", "save_hf_model")

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE.update({name: "integrations.hf" for name in _HF_EXPORTS})

__all__ = ["__version__", *_SUBMODULES, *(name for names in _EXPORTS.values() for name in names)]


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_HF_EXPORTS})
