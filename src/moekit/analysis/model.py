"""One call that analyses a routed model: utilisation and specialisation metrics per layer, metric
against inference-time k, metric with each single expert forced, and t-SNE of gate logits.

Works on any moekit model and on Hugging Face MoE models (through their routing sources).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import Tensor, nn

from ..routers.base import Router
from .collect import collect_routing
from .interventions import accuracy_vs_k, forced_expert_accuracy, routed_layers
from .metrics import LayerAnalysis, analyze_layer, embed_logits

__all__ = ["ModelAnalysis", "analyze_model"]


@dataclass
class ModelAnalysis:
    """Everything ``write_analysis_report`` shows. ``notes`` says which analyses were skipped and why."""

    layers: dict[str, LayerAnalysis]
    metric: float | None = None
    metric_vs_k: dict[int, float] = field(default_factory=dict)
    trained_k: int | None = None
    forced: dict[str, list[float]] = field(default_factory=dict)
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    embedding_labels: dict[str, Tensor | None] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    group_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    label_name: str = "label"
    metric_name: str = "metric"
    higher_is_better: bool = True
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": {n: a.as_dict() for n, a in self.layers.items()},
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "metric": self.metric,
            "metric_vs_k": {str(k): v for k, v in self.metric_vs_k.items()},
            "trained_k": self.trained_k,
            "forced_expert_metric": self.forced,
            "class_names": list(self.class_names),
            "label_name": self.label_name,
            "notes": self.notes,
        }


def analyze_model(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    labels: Callable[[Any], Tensor | None] | None = None,
    metadata: Callable[[Any], Mapping[str, Tensor]] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    ks: Iterable[int] | None = None,
    forced: bool = True,
    tsne: bool = True,
    max_tokens: int = 4096,
    num_labels: int | None = None,
    class_names: Sequence[str] = (),
    group_names: Mapping[str, Sequence[str]] | None = None,
    label_name: str = "label",
    metric_name: str = "metric",
    higher_is_better: bool = True,
    seed: int = 0,
) -> ModelAnalysis:
    """Analyse ``model`` on ``batches`` (a re-iterable sequence).

    Args:
        forward, labels, metadata, max_tokens: as in ``collect_routing``.
        evaluate: ``evaluate(model) -> float`` (e.g. test accuracy); enables the k sweep and forced experts.
        ks: inference-time k values (default 1..E of the smallest layer when every router supports it).
        forced: evaluate with each single expert forced, per layer (moekit routers only).
        tsne: 2-D t-SNE of each layer's gate logits.
        class_names, group_names, label_name: names of the label values and of each metadata key's values,
            and what the labels are (for the report).
        metric_name, higher_is_better: what ``evaluate`` measures (for the report).
    """
    record = collect_routing(model, batches, forward=forward, labels=labels, metadata=metadata, max_tokens=max_tokens)
    result = ModelAnalysis(
        {n: analyze_layer(r, num_labels=num_labels) for n, r in record.layers.items()},
        class_names=tuple(class_names),
        group_names={k: tuple(v) for k, v in (group_names or {}).items()},
        label_name=label_name,
        metric_name=metric_name,
        higher_is_better=higher_is_better,
    )
    routers = routed_layers(model, list(record.layers))
    result.trained_k = _trained_k(routers)
    if evaluate is not None:
        result.metric = float(evaluate(model))
        _sweep_k(model, evaluate, ks, result)
        if forced:
            _forced(model, evaluate, routers, result)
    if tsne:
        for name, r in record.layers.items():
            if r.logits_TE is None or r.logits_TE.shape[0] < 5:
                result.notes.append(f"t-SNE skipped for {name}: the router gave fewer than 5 logit rows")
                continue
            result.embeddings[name] = embed_logits(r.logits_TE, seed=seed)
            result.embedding_labels[name] = (
                None if r.labels_T is None else r.labels_T[: result.embeddings[name].shape[0]]
            )
    return result


def _trained_k(routers: Mapping[str, nn.Module]) -> int | None:
    for router in routers.values():
        k = getattr(router, "k" if isinstance(router, Router) else "top_k", None)
        if isinstance(k, int):
            return k
    return None


def _sweep_k(
    model: nn.Module, evaluate: Callable[[nn.Module], float], ks: Iterable[int] | None, result: ModelAnalysis
) -> None:
    if ks is None:
        smallest = min(a.num_experts for a in result.layers.values())
        try:
            result.metric_vs_k = accuracy_vs_k(model, evaluate, range(1, smallest + 1))
        except ValueError as err:
            result.notes.append(f"no inference-k sweep: {err}")
        return
    result.metric_vs_k = accuracy_vs_k(model, evaluate, ks)


def _forced(
    model: nn.Module, evaluate: Callable[[nn.Module], float], routers: Mapping[str, nn.Module], result: ModelAnalysis
) -> None:
    for name, router in routers.items():
        if not isinstance(router, Router):
            result.notes.append(f"no forced-expert evaluation for {name}: forcing needs a moekit router")
            continue
        result.forced[name] = forced_expert_accuracy(model, evaluate, layer=name)
