"""Routing statistics: the one recorder of routing decisions, and the one definition of each statistic.

    with RoutingRecorder(model) as rec:
        for x, y in loader:
            rec.set_labels(y)      # optional: per-label tables
            model(x)
    metrics = rec.metrics()        # {layer name: RoutingMetrics}

By default every moekit ``Router`` inside the model is hooked (its output is a RoutingDecision);
``sources`` adds other modules (e.g. a Hugging Face router) with a function that turns their output
into a RoutingDecision. ``keep_rows`` also keeps the first tokens' routing row by row (gates, ids,
logits, entropies, labels, metadata) for analyses that condition on them (``moekit.analysis``).
Analysis, merging and the experiments all read these statistics, with these definitions:

======================  ===========================================================================
``tokens``              rows routed (tokens, or examples / segments for per-example layers)
``counts_E``            kept slots per expert (``tokens_per_expert``)
``importance_E``        sum over tokens of each expert's combine weight (``gates_TE``)
``mean_gate_E``         ``importance_E / tokens``
``cv_importance``       ``coefficient_of_variation(importance_E)``: population std / mean (NaN at mean 0)
``cv_counts``           ``coefficient_of_variation(counts_E)``
``entropy``             mean over tokens of ``router_entropy(probs_TE)``, nats (NaN without probabilities)
``max_violation``       ``max(counts_E) / mean(counts_E) - 1`` (0 = perfectly balanced)
``living_experts``      experts with ``mean_gate_E > 0.01`` (Pavlitska et al., https://arxiv.org/abs/2204.10598)
``used_experts``        experts with at least one kept slot (``counts_E > 0``)
``coactivation_EE``     tokens that chose both experts i and j (diagonal = counts)
======================  ===========================================================================
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .routers.base import Router
from .types import RoutingDecision

__all__ = [
    "LayerStats", "RoutingMetrics", "RoutingRecorder", "record_routing", "routing_metrics", "capture_decisions",
    "DecisionFn", "router_sources", "token_values", "default_forward", "coefficient_of_variation", "router_entropy",
    "living_experts", "used_experts", "LIVING_THRESHOLD",
]  # fmt: skip

#: turns a hooked module's output into a RoutingDecision
DecisionFn = Callable[[Any], RoutingDecision]

#: an expert is "living" when its mean gate weight exceeds this (Pavlitska et al., Sec. IV)
LIVING_THRESHOLD = 0.01


def coefficient_of_variation(x_E: Tensor) -> float:
    """Population std / mean over experts (0 = perfectly balanced; NaN when the mean is 0)."""
    x = x_E.double()
    mean = float(x.mean())
    return float(x.std(correction=0)) / mean if mean > 0 else math.nan


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Each token's router entropy in nats: ``-sum_e p log p`` over ``[T, E]`` -> ``[T]`` (fp64)."""
    p = probs_TE.detach().double()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def living_experts(mean_gate_E: Tensor, threshold: float = LIVING_THRESHOLD) -> int:
    """Experts whose mean gate weight over tokens exceeds ``threshold`` (the paper's "living" experts)."""
    return int((mean_gate_E > threshold).sum())


def used_experts(counts_E: Tensor) -> int:
    """Experts that received at least one kept slot."""
    return int((counts_E > 0).sum())


def token_values(values: Tensor, num_tokens: int, what: str) -> Tensor:
    """Per-example values ``[B]`` broadcast to ``num_tokens`` (T = B * S) tokens, flattened to ``[T]``."""
    values = torch.as_tensor(values).reshape(-1)
    if values.numel() == 0 or num_tokens % values.numel():
        verb = "have" if what.endswith("s") else "has"
        raise ValueError(
            f"{what} {verb} {values.numel()} entries but the layer routed {num_tokens} tokens; "
            "give one per example or per token"
        )
    return values.repeat_interleave(num_tokens // values.numel())


def _identity(decision: RoutingDecision) -> RoutingDecision:
    return decision


def router_sources(model: nn.Module) -> dict[str, tuple[nn.Module, DecisionFn]]:
    """``{name: (router, identity)}`` for every moekit ``Router`` inside ``model``."""
    return {name: (m, _identity) for name, m in model.named_modules() if isinstance(m, Router)}


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How a recording runs one batch by default: ``model(batch[0])`` for tuples/lists, else ``model(batch)``."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@dataclass
class LayerStats:
    """Running sums for one layer (all on CPU, fp64 where they accumulate).

    counts_E: kept slots per expert; importance_E: sum of combine weights; coactivation_EE: tokens
    that chose both i and j (diagonal = counts); entropy_sum: sum of per-token router entropies;
    label_counts_LE / label_gates_LE: per-label counts and gate mass (when labels are set);
    logits: router logits kept when ``keep_logits`` (up to ``max_tokens`` rows).
    """

    num_experts: int
    tokens: int = 0
    counts_E: Tensor = field(init=False)
    importance_E: Tensor = field(init=False)
    coactivation_EE: Tensor = field(init=False)
    entropy_sum: float = 0.0
    entropy_tokens: int = 0
    label_counts_LE: Tensor | None = None
    label_gates_LE: Tensor | None = None
    logits: list[Tensor] = field(default_factory=list)
    logit_rows: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        self.counts_E = torch.zeros(E, dtype=torch.float64)
        self.importance_E = torch.zeros(E, dtype=torch.float64)
        self.coactivation_EE = torch.zeros(E, E, dtype=torch.float64)

    @torch.no_grad()
    def add(self, decision: RoutingDecision, labels_T: Tensor | None, keep_logits: bool, max_tokens: int | None) -> None:
        gates = decision.gates_TE().detach().double().cpu()
        chosen = torch.zeros_like(gates)
        chosen.scatter_(1, decision.ids_TK.cpu(), decision.kept_mask().double().cpu())
        self.tokens += decision.num_tokens
        self.counts_E += chosen.sum(0)
        self.importance_E += gates.sum(0)
        self.coactivation_EE += chosen.t() @ chosen
        if decision.probs_TE is not None:
            self.entropy_sum += float(router_entropy(decision.probs_TE.cpu()).sum())
            self.entropy_tokens += decision.probs_TE.shape[0]
        if labels_T is not None:
            self._add_labels(labels_T, chosen, gates)
        if keep_logits and decision.logits_TE is not None:
            rows = decision.logits_TE.detach().float().cpu()
            if max_tokens is not None:
                rows = rows[: max(0, max_tokens - self.logit_rows)]
            if rows.shape[0]:
                self.logits.append(rows)
                self.logit_rows += rows.shape[0]

    def _add_labels(self, labels_T: Tensor, chosen: Tensor, gates: Tensor) -> None:
        labels_T = labels_T.long().cpu()
        num_labels = int(labels_T.max()) + 1 if labels_T.numel() else 0
        if self.label_counts_LE is None:
            self.label_counts_LE = torch.zeros(0, self.num_experts, dtype=torch.float64)
            self.label_gates_LE = torch.zeros(0, self.num_experts, dtype=torch.float64)
        assert self.label_gates_LE is not None
        if num_labels > self.label_counts_LE.shape[0]:
            pad = num_labels - self.label_counts_LE.shape[0]
            self.label_counts_LE = torch.cat([self.label_counts_LE, torch.zeros(pad, self.num_experts, dtype=torch.float64)])
            self.label_gates_LE = torch.cat([self.label_gates_LE, torch.zeros(pad, self.num_experts, dtype=torch.float64)])
        self.label_counts_LE.index_add_(0, labels_T, chosen)
        self.label_gates_LE.index_add_(0, labels_T, gates)

    def logits_TE(self) -> Tensor:
        """All kept router logits, ``[T, E]`` (empty if none were kept)."""
        return torch.cat(self.logits) if self.logits else torch.zeros(0, self.num_experts)

    def mean_gate_E(self) -> Tensor:
        """Mean combine weight per expert over the recorded tokens, fp64 ``[E]``."""
        return self.importance_E / max(self.tokens, 1)


@dataclass(frozen=True)
class RoutingMetrics:
    """Summary of one layer's routing over the recorded data.

    Attributes:
        tokens_per_expert: kept slots per expert ``[E]``.
        importance: total gate weight per expert ``[E]``.
        cv_importance, cv_counts: population std/mean over experts.
        entropy: mean per-token router entropy (nats; NaN when the router has no distribution).
        max_violation: ``max(counts) / mean(counts) - 1`` (0 = perfectly balanced).
        living_experts: experts whose mean gate exceeds ``LIVING_THRESHOLD`` (the paper's definition; before
            moekit 0.2 this field counted experts with at least one token, now ``used_experts``).
        used_experts: experts that received at least one kept slot.
        coactivation: ``[E, E]`` tokens that chose both experts.
    """

    tokens: int
    tokens_per_expert: Tensor
    importance: Tensor
    cv_importance: float
    cv_counts: float
    entropy: float
    max_violation: float
    living_experts: int
    coactivation: Tensor
    used_experts: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "importance": self.importance.tolist(),
            "cv_importance": self.cv_importance,
            "cv_counts": self.cv_counts,
            "entropy": self.entropy,
            "max_violation": self.max_violation,
            "living_experts": self.living_experts,
            "used_experts": self.used_experts,
            "coactivation": self.coactivation.tolist(),
        }


def routing_metrics(stats: LayerStats) -> RoutingMetrics:
    """The summary of one layer's ``LayerStats`` (definitions in the module docstring)."""
    counts = stats.counts_E
    mean = float(counts.mean())
    return RoutingMetrics(
        tokens=stats.tokens,
        tokens_per_expert=counts.clone(),
        importance=stats.importance_E.clone(),
        cv_importance=coefficient_of_variation(stats.importance_E),
        cv_counts=coefficient_of_variation(counts),
        entropy=stats.entropy_sum / stats.entropy_tokens if stats.entropy_tokens else math.nan,
        max_violation=float(counts.max()) / mean - 1.0 if mean > 0 else math.nan,
        living_experts=living_experts(stats.mean_gate_E()),
        coactivation=stats.coactivation_EE.clone(),
        used_experts=used_experts(counts),
    )


class RoutingRecorder:
    """Context manager that hooks routers and accumulates ``LayerStats`` per layer name.

    Args:
        model: the model to observe (it is not modified beyond temporary forward hooks).
        sources: extra ``{name: (module, output -> RoutingDecision)}`` for routers moekit does not own.
        layers: restrict to these names (default: all found).
        keep_logits: also keep router logits (needed by merging), up to ``max_tokens`` per layer.
        keep_rows: also keep the first ``keep_rows`` tokens' routing per layer, row by row (``rows``:
            ``gates [T, E]``, ``ids [T, K]``, ``logits``, ``entropy [T]``, ``labels [T]``, ``meta:<key> [T]``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sources: Mapping[str, tuple[nn.Module, DecisionFn]] | None = None,
        layers: Iterable[str] | None = None,
        keep_logits: bool = False,
        max_tokens: int | None = None,
        keep_rows: int = 0,
    ) -> None:
        found: dict[str, tuple[nn.Module, DecisionFn]] = router_sources(model)
        given = {id(m) for m, _ in (sources or {}).values()}  # a router named in sources is recorded under that name
        found = {n: v for n, v in found.items() if id(v[0]) not in given}
        found.update(sources or {})
        if layers is not None:
            wanted = list(layers)
            missing = [n for n in wanted if n not in found]
            if missing:
                raise ValueError(f"layers {missing} not found; routed layers are {sorted(found)}")
            found = {n: found[n] for n in wanted}
        self.sources = found
        self.keep_logits = keep_logits
        self.max_tokens = max_tokens
        self.keep_rows = keep_rows
        self.stats: dict[str, LayerStats] = {}
        self.rows: dict[str, dict[str, list[Tensor]]] = {}
        self._labels: Tensor | None = None
        self._meta: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def set_labels(self, labels: Tensor | None) -> None:
        """Labels of the next forward's examples ``[B]`` (broadcast to tokens when T = B * S)."""
        self._labels = None if labels is None else torch.as_tensor(labels).reshape(-1)

    def set_meta(self, meta: Mapping[str, Tensor] | None) -> None:
        """Integer metadata ``{key: [B]}`` of the next forward's examples, kept with the rows (``keep_rows``)."""
        self._meta = {k: torch.as_tensor(v) for k, v in (meta or {}).items()}

    def __enter__(self) -> "RoutingRecorder":
        for name, (module, to_decision) in self.sources.items():
            self._handles.append(module.register_forward_hook(self._hook(name, to_decision)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str, to_decision: DecisionFn) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            decision = to_decision(output)
            stats = self.stats.setdefault(name, LayerStats(decision.num_experts))
            labels = None if self._labels is None else token_values(self._labels, decision.num_tokens, "labels")
            stats.add(decision, labels, self.keep_logits, self.max_tokens)
            if self.keep_rows:
                self._keep_rows(name, decision, labels)

        return hook

    @torch.no_grad()
    def _keep_rows(self, name: str, d: RoutingDecision, labels_T: Tensor | None) -> None:
        rows = self.rows.setdefault(name, {})
        have = sum(t.shape[0] for t in rows.get("gates", []))
        take = min(self.keep_rows - have, d.num_tokens)
        if take <= 0:
            return
        values = {"gates": d.gates_TE().detach().float().cpu(), "ids": d.ids_TK.detach().cpu()}
        if d.logits_TE is not None:
            values["logits"] = d.logits_TE.detach().float().cpu()
        if d.probs_TE is not None:
            values["entropy"] = router_entropy(d.probs_TE.cpu())
        if labels_T is not None:
            values["labels"] = labels_T
        for key, v in self._meta.items():
            values[f"meta:{key}"] = token_values(v, d.num_tokens, f"metadata {key!r}")
        for key, v in values.items():
            rows.setdefault(key, []).append(v[:take])

    def metrics(self) -> dict[str, RoutingMetrics]:
        return {name: routing_metrics(s) for name, s in self.stats.items()}


@contextlib.contextmanager
def capture_decisions(model: nn.Module) -> Iterator[list[RoutingDecision]]:
    """Collect the RoutingDecision of every moekit router that runs inside the block, in call order,
    *with* autograd history (for estimators such as REINFORCE that need the decision in the loss)."""
    decisions: list[RoutingDecision] = []
    handles = [
        m.register_forward_hook(lambda module, args, out: decisions.append(out))
        for m in model.modules()
        if isinstance(m, Router)
    ]
    try:
        yield decisions
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_routing(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    labels: Callable[[Any], Tensor | None] | None = None,
    metadata: Callable[[Any], Mapping[str, Tensor]] | None = None,
    **recorder_kwargs: Any,
) -> RoutingRecorder:
    """Run ``model`` in eval mode over ``batches`` and return the filled recorder.

    ``forward(model, batch)`` runs one batch (default: ``model(batch[0])`` for tuples, else
    ``model(batch)``); ``labels(batch)`` gives per-example labels for the per-label tables;
    ``metadata(batch) -> {key: [B]}`` integer metadata kept with the rows (``keep_rows``).
    """
    was_training = model.training
    model.eval()
    run = forward or default_forward
    try:
        with RoutingRecorder(model, **recorder_kwargs) as rec:
            for batch in batches:
                rec.set_labels(labels(batch) if labels else None)
                rec.set_meta(metadata(batch) if metadata else None)
                run(model, batch)
    finally:
        model.train(was_training)
    if not rec.stats:
        raise ValueError("no routed layer ran on the given batches (none of the recorded routers was called)")
    return rec
