"""Routing analysis for any moekit or Hugging Face MoE model: utilisation, specialisation, interventions.

from moekit.analysis import analyze_model, write_analysis_report
result = analyze_model(model, batches, labels=lambda b: b[1], evaluate=my_accuracy)
write_analysis_report(result, "runs/analysis")
"""

from .collect import LayerRecord, RoutingRecord, collect_routing, routing_sources_for
from .interventions import accuracy_vs_k, force_expert, forced_expert_accuracy, inference_k, routed_layers
from .metrics import (
    LayerAnalysis,
    analyze_layer,
    class_expert_table,
    coefficient_of_variation,
    embed_logits,
    label_entropy,
    living_experts,
    mutual_information,
)
from .model import ModelAnalysis, analyze_model
from .report import analysis_markdown, write_analysis_report

__all__ = [
    "LayerRecord",
    "RoutingRecord",
    "collect_routing",
    "routing_sources_for",
    "force_expert",
    "inference_k",
    "accuracy_vs_k",
    "forced_expert_accuracy",
    "routed_layers",
    "LayerAnalysis",
    "analyze_layer",
    "class_expert_table",
    "coefficient_of_variation",
    "embed_logits",
    "label_entropy",
    "living_experts",
    "mutual_information",
    "ModelAnalysis",
    "analyze_model",
    "analysis_markdown",
    "write_analysis_report",
]
