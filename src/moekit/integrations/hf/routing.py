"""Routing statistics of Hugging Face MoE models with moekit's ``RoutingRecorder``.

    from moekit import RoutingRecorder
    from moekit.integrations.hf import routing_sources

    with RoutingRecorder(model, sources=routing_sources(model), keep_logits=True) as rec:
        model(input_ids=ids)
    rec.metrics()   # {"model.layers.0.mlp": RoutingMetrics, ...}

Layers are named by their MoE block (e.g. ``model.layers.0.mlp``); exact-form merged blocks report
their original router's E outputs; blocks with moekit routers (``replace_routers``) report the moekit
router's own decision.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ...types import RoutingDecision
from .base import family_for

__all__ = ["routing_sources"]


def routing_sources(model: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Any], RoutingDecision]]]:
    """``{MoE block name: (router module, router output -> RoutingDecision)}`` for ``RoutingRecorder``.

    Raises ValueError for a model whose ``config.model_type`` has no registered family.
    """
    family = family_for(model)
    blocks = family.blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} ({family.name}) has no sparse MoE block")
    from .replace import MoekitGate

    sources: dict[str, tuple[nn.Module, Callable[[Any], RoutingDecision]]] = {}
    for name, block in blocks.items():
        router = family.router(block)
        sources[name] = (router.router, _same) if isinstance(router, MoekitGate) else (router, family.decision)
    return sources


def _same(decision: RoutingDecision) -> RoutingDecision:
    return decision
