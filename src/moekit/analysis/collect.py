"""Collect per-token routing of any moekit model or Hugging Face MoE model for analysis.

moekit routers are found by type; a model without any (a Hugging Face MoE checkpoint) is read
through ``moekit.integrations.hf.routing_sources`` (imported only then). Aggregates come from
``moekit.stats.RoutingRecorder``; on top, the first ``max_tokens`` tokens' gates, logits, labels and
metadata are kept per layer, so that analyses can condition on anything (mutual information, t-SNE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..routers.base import Router
from ..stats import LayerStats, RoutingRecorder
from ..types import RoutingDecision

__all__ = ["LayerRecord", "RoutingRecord", "routing_sources_for", "collect_routing", "token_values"]

DecisionFn = Callable[[Any], RoutingDecision]
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
    found: Sources = {name: (m, _identity) for name, m in model.named_modules() if isinstance(m, Router)}
    if found:
        return found
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no moekit router and is not a Hugging Face model: nothing to analyse"
        )
    from ..integrations.hf import routing_sources

    return dict(routing_sources(model))


def _identity(decision: RoutingDecision) -> RoutingDecision:
    return decision


def token_values(values: Tensor, num_tokens: int, what: str) -> Tensor:
    """Per-example values ``[B]`` broadcast to ``num_tokens`` (T = B * S) tokens, flattened to ``[T]``."""
    values = torch.as_tensor(values).reshape(-1)
    if values.numel() == 0 or num_tokens % values.numel():
        raise ValueError(
            f"{what} has {values.numel()} entries but the layer routed {num_tokens} tokens; "
            "give one per example or per token"
        )
    return values.repeat_interleave(num_tokens // values.numel())


class _Keeper:
    """Keeps the first ``max_tokens`` tokens' routing of every layer."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.rows: dict[str, dict[str, list[Tensor]]] = {}
        self.labels: Tensor | None = None
        self.meta: dict[str, Tensor] = {}

    def wrap(self, name: str, fn: DecisionFn) -> DecisionFn:
        def capture(output: Any) -> RoutingDecision:
            decision = fn(output)
            self.add(name, decision)
            return decision

        return capture

    @torch.no_grad()
    def add(self, name: str, d: RoutingDecision) -> None:
        rows = self.rows.setdefault(name, {})
        have = sum(t.shape[0] for t in rows.get("gates", []))
        take = min(self.max_tokens - have, d.num_tokens)
        if take <= 0:
            return
        values = {"gates": d.gates_TE().detach().float().cpu(), "ids": d.ids_TK.detach().cpu()}
        if d.logits_TE is not None:
            values["logits"] = d.logits_TE.detach().float().cpu()
        if d.probs_TE is not None:
            p = d.probs_TE.detach().double().cpu()
            values["entropy"] = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        if self.labels is not None:
            values["labels"] = token_values(self.labels, d.num_tokens, "labels")
        for key, v in self.meta.items():
            values[f"meta:{key}"] = token_values(v, d.num_tokens, f"metadata {key!r}")
        for key, v in values.items():
            rows.setdefault(key, []).append(v[:take])


@torch.no_grad()
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
    keeper = _Keeper(max_tokens)
    wrapped = {n: (m, keeper.wrap(n, fn)) for n, (m, fn) in (sources or routing_sources_for(model)).items()}
    run = forward or (lambda m, b: m(b[0]) if isinstance(b, (tuple, list)) else m(b))
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model, sources=wrapped, layers=list(wrapped)) as rec:
            for batch in batches:
                keeper.labels = labels(batch) if labels else None
                keeper.meta = {k: torch.as_tensor(v) for k, v in (metadata(batch) if metadata else {}).items()}
                rec.set_labels(keeper.labels)
                run(model, batch)
    finally:
        model.train(was_training)
    if not rec.stats:
        raise ValueError("no routed layer ran on the given batches")
    layers = {}
    for name in wrapped:
        if name not in rec.stats:
            continue
        rows = {k: torch.cat(v) for k, v in keeper.rows[name].items()}
        meta = {k.split(":", 1)[1]: v for k, v in rows.items() if k.startswith("meta:")}
        layers[name] = LayerRecord(
            name, rec.stats[name], rows["gates"], rows["ids"], rows.get("logits"), rows.get("labels"), meta,
            rows.get("entropy"),
        )
    return RoutingRecord(layers)
