"""Routing analysis for any moekit or Hugging Face MoE model: utilisation, load over the data, entropy,
co-activation, specialisation (labels, metadata, tokens), interventions.

from moekit.analysis import analyze_model, write_analysis_report
result = analyze_model(model, batches, labels=lambda b: b[1], evaluate=my_accuracy)
write_analysis_report(result, "moekit-runs/analyze/my-model")

``EvalSet`` / ``ModelRunner`` / ``load_analysis_model`` are what ``moekit analyze`` builds on: data
that fits the model (saved with the model, or built in), and how to run and score it.
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
from .evalset import CHAR_CLASSES, EvalSet, char_class
from .model import ModelAnalysis, analyze_model
from .report import analysis_markdown, write_analysis_report
from .target import (
    BUILTIN_DATA,
    ModelRunner,
    RunSpec,
    builtin_eval_set,
    byte_eval_set,
    default_eval_set,
    eval_set_for,
    image_eval_set,
    input_kind,
    load_analysis_model,
    multitask_eval_set,
    read_runs,
    resolve_run,
)

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
    "EvalSet",
    "CHAR_CLASSES",
    "char_class",
    "BUILTIN_DATA",
    "ModelRunner",
    "RunSpec",
    "builtin_eval_set",
    "byte_eval_set",
    "default_eval_set",
    "eval_set_for",
    "image_eval_set",
    "multitask_eval_set",
    "input_kind",
    "load_analysis_model",
    "read_runs",
    "resolve_run",
]
