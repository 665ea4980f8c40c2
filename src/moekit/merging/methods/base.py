"""``ExpertMethod``: the interface of an expert-reduction method, and group-limited routing.

With group-limited routing (DeepSeek ``n_group``/``topk_group``) the router splits its E outputs
into equal contiguous groups, so every group must keep the same number of experts and an expert may
only merge within its group: ``reduce_block`` runs the method on each group separately (its slice of
the weights and statistics, ``slice_statistics``) and puts the groups back in order.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from ...registry import EXPERT_METHODS
from ..weights import ExpertLayerWeights, LayerMergeResult, RoutingSpec

__all__ = ["ExpertMethod", "Stats", "create_method", "list_methods", "option_names", "reduce_block"]

#: one block's statistics: ``{statistic name: {key: tensor}}`` (see ``moekit.merging.statistics``)
Stats = Mapping[str, Mapping[str, Tensor]]


class ExpertMethod(abc.ABC):
    """Reduces one MoE block from E to G experts. Options are constructor keywords."""

    name: ClassVar[str]
    #: whether the method honours ``--protect-super-experts`` (``stats["protected"]["mask"]``)
    protects: ClassVar[bool] = False
    #: whether ``reduce`` replaces pruned experts by novices (``LayerMergeResult.novices``; exact form only)
    novices: ClassVar[bool] = False

    @abc.abstractmethod
    def statistics(self) -> dict[str, dict[str, Any]]:
        """``{statistic name: options}`` the observer must collect on the original block."""

    def budget_score(self, stats: Stats) -> Tensor:
        """Per-expert score ``[E]`` a global budget compares across layers (default: routed counts,
        M-SMoE's activation frequency)."""
        return stats["counts"]["counts"]

    def budget_statistics(self) -> dict[str, dict[str, Any]]:
        """Statistics ``budget_score`` reads (observed on the original model for a global budget)."""
        return {"counts": {}}

    @abc.abstractmethod
    def reduce(self, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec) -> LayerMergeResult:
        """The block with ``num_experts`` (G) experts."""

    def slice_statistics(self, stats: Stats, experts: Tensor) -> dict[str, dict[str, Tensor]]:
        """The statistics of the experts ``experts`` only (for group-limited routing). Default:
        per-expert tensors are sliced on their first axis, router logits on their last."""
        out: dict[str, dict[str, Tensor]] = {}
        if "layer_io" in stats:
            raise ValueError(f"method {self.name!r} needs whole-block outputs, which group-limited routing splits")
        for name, values in stats.items():
            out[name] = {}
            for key, t in values.items():
                if name == "router_logits":
                    out[name][key] = t[:, experts]
                elif name in ("router_inputs",) or t.dim() == 0:
                    out[name][key] = t
                else:
                    out[name][key] = t[experts]
        return out


def create_method(name: str, **options: Any) -> ExpertMethod:
    """A registered method (``moekit.registry.EXPERT_METHODS``) with its options."""
    return EXPERT_METHODS.get(name)(**options)


def list_methods() -> list[str]:
    return EXPERT_METHODS.names()


def option_names(name: str) -> list[str]:
    """The options (keyword-only constructor arguments) of a registered method."""
    import inspect

    params = inspect.signature(EXPERT_METHODS.get(name).__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def reduce_block(
    method: ExpertMethod, weights: ExpertLayerWeights, stats: Stats, num_experts: int, routing: RoutingSpec
) -> LayerMergeResult:
    """``method.reduce``, group by group when the block routes group-limited (``routing.groups > 1``)."""
    n = routing.groups
    if n <= 1:
        return method.reduce(weights, stats, num_experts, routing)
    E = weights.num_experts
    if E % n or num_experts % n:
        raise ValueError(f"group-limited routing with n_group={n} needs expert counts divisible by {n}, got {E} -> {num_experts}")
    size, keep = E // n, num_experts // n
    parts = []
    for g in range(n):
        idx = torch.arange(g * size, (g + 1) * size)
        sub = weights.replace(
            params={k: v[idx] for k, v in weights.params.items()}, router_weight=weights.router_weight[idx],
            router_bias=None if weights.router_bias is None else weights.router_bias[idx],
            router_extras={k: v[idx] for k, v in weights.router_extras.items()},
        )  # fmt: skip
        parts.append(method.reduce(sub, method.slice_statistics(stats, idx), keep, RoutingSpec(routing.score, routing.top_k)))
    cat = lambda ts: torch.cat(ts)  # noqa: E731
    first = parts[0].weights
    merged = first.replace(
        params={k: cat([p.weights.params[k] for p in parts]) for k in first.params},
        router_weight=cat([p.weights.router_weight for p in parts]),
        router_bias=None if first.router_bias is None else cat([p.weights.router_bias for p in parts]),  # type: ignore[misc]
        router_extras={k: cat([p.weights.router_extras[k] for p in parts]) for k in first.router_extras},
    )  # fmt: skip
    expert_map = cat([p.expert_map + g * keep for g, p in enumerate(parts)])
    dominant = cat([p.dominant + g * size for g, p in enumerate(parts)])
    if parts[0].novices is None:
        return LayerMergeResult(weights=merged, expert_map=expert_map, dominant=dominant)
    novices = cat([p.novices for p in parts])  # type: ignore[misc]
    mask = cat([p.novice_mask for p in parts])  # type: ignore[misc]
    return LayerMergeResult(weights=merged, expert_map=expert_map, dominant=dominant, novices=novices, novice_mask=mask)
