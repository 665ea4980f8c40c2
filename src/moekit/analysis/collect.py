"""Collect per-token routing of any moekit model or Hugging Face MoE model for analysis.

moekit routers are found by type; a model without any (a Hugging Face MoE checkpoint) is read
through ``moekit.integrations.hf.routing_sources`` (imported only then). Aggregates come from
``moekit.stats.RoutingRecorder`` (the one recorder), which also keeps the first ``max_tokens`` tokens'
gates, logits, labels and metadata per layer (``keep_rows``), so that analyses can condition on anything
(mutual information, t-SNE). The statistics' definitions are those of ``moekit.stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..stats import DecisionFn, LayerStats, record_routing, router_sources, token_values

__all__ = ["LayerRecord", "RoutingRecord", "routing_sources_for", "collect_routing", "token_values"]

Sources = dict[str, tuple[nn.Module, DecisionFn]]


@dataclass
class LayerRecord:
    """One routed layer: aggregate ``stats`` over all tokens, and per-token rows for the first tokens.

    Attributes:
        gates_TE: effective combine weights ``[T, E]``; ``ids_TK``: chosen experts ``[T, K]``;
        logits_TE: router logits (None when the router has none); labels_T / meta_T: per-token values;
        entropy_T: each token's router entropy in nats (None when the router gives no distribution).
    """

    name: str
    stats: LayerStats
    gates_TE: Tensor
    ids_TK: Tensor
    logits_TE: Tensor | None
    labels_T: Tensor | None
    meta_T: dict[str, Tensor] = field(default_factory=dict)
    entropy_T: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.stats.num_experts


@dataclass
class RoutingRecord:
    """``{layer name: LayerRecord}`` in model order."""

    layers: dict[str, LayerRecord]


def routing_sources_for(model: nn.Module) -> Sources:
    """``{name: (module, output -> RoutingDecision)}``: every moekit Router, or for a model with none,
    the Hugging Face integration's sources (raises ValueError when the model has neither)."""
    found: Sources = router_sources(model)
    if found:
        return found
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no moekit router and is not a Hugging Face model: nothing to analyse"
        )
    from ..integrations.hf import routing_sources

    return dict(routing_sources(model))


def collect_routing(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    labels: Callable[[Any], Tensor | None] | None = None,
    metadata: Callable[[Any], Mapping[str, Tensor]] | None = None,
    max_tokens: int = 4096,
    sources: Mapping[str, tuple[nn.Module, DecisionFn]] | None = None,
) -> RoutingRecord:
    """Run ``model`` in eval mode over ``batches`` and record every routed layer.

    Args:
        forward: ``forward(model, batch)`` (default: ``model(batch[0])`` for tuples, else ``model(batch)``).
        labels: ``labels(batch) -> [B]`` per-example (or per-token) labels.
        metadata: ``metadata(batch) -> {key: [B]}`` integer metadata (domain, superclass, ...).
        max_tokens: per-token rows kept per layer (aggregates use every token).
        sources: routed layers to read (default: ``routing_sources_for(model)``).
    """
    check_int("max_tokens", max_tokens, low=1)
    chosen = dict(sources or routing_sources_for(model))
    rec = record_routing(model, batches, forward=forward, labels=labels, metadata=metadata, sources=chosen,
                         layers=list(chosen), keep_rows=max_tokens)  # fmt: skip
    layers = {}
    for name in chosen:
        if name not in rec.stats:
            continue
        rows = {k: torch.cat(v) for k, v in rec.rows[name].items()}
        meta = {k.split(":", 1)[1]: v for k, v in rows.items() if k.startswith("meta:")}
        layers[name] = LayerRecord(
            name, rec.stats[name], rows["gates"], rows["ids"], rows.get("logits"), rows.get("labels"), meta,
            rows.get("entropy"),
        )
    return RoutingRecord(layers)
