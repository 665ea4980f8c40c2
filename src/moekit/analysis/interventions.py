"""Inference-time interventions on routing: force one expert, or change how many experts run.

Both are context managers that undo themselves on exit (also on error):

    with force_expert(model, 2, layers=["stages.1.router"]):
        acc = evaluate(model)          # every image of that layer goes to expert 2 only
    with inference_k(model, 1):
        acc = evaluate(model)          # top-1 instead of the trained top-k

``force_expert`` replaces a router's decision through a forward hook (any moekit router; weight 1 on
the forced expert). ``inference_k`` sets ``k`` on moekit top-k routers, or ``top_k`` on Hugging Face
routers that have one (Mixtral-style), and restores it afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .._checks import check_int
from ..routers.base import Router
from ..routers.topk import TopKRouter
from ..types import RoutingDecision
from .collect import routing_sources_for

__all__ = ["routed_layers", "force_expert", "inference_k", "accuracy_vs_k", "forced_expert_accuracy"]

Evaluate = Callable[[nn.Module], float]


def routed_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """``{name: router module}`` of the model's routed layers (moekit routers, else Hugging Face)."""
    found = {name: module for name, (module, _) in routing_sources_for(model).items()}
    if layers is None:
        return found
    wanted = list(layers)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"layers {missing} not found; routed layers are {sorted(found)}")
    return {n: found[n] for n in wanted}


def _forced(decision: RoutingDecision, expert: int) -> RoutingDecision:
    T = decision.num_tokens
    ids = torch.full((T, 1), expert, dtype=torch.long, device=decision.ids_TK.device)
    weights = torch.ones(T, 1, dtype=decision.weights_TK.dtype, device=decision.weights_TK.device)
    return replace(decision, ids_TK=ids, weights_TK=weights, kept_TK=None, load_prob_TE=None)


@contextmanager
def force_expert(model: nn.Module, expert: int, *, layers: Iterable[str] | None = None) -> Iterator[None]:
    """Route every token of the chosen layers (default: all) to ``expert`` alone, with weight 1."""
    targets = routed_layers(model, layers)
    handles = []
    try:
        for name, router in targets.items():
            if not isinstance(router, Router):
                raise ValueError(f"forcing an expert needs a moekit router; {name!r} is {type(router).__name__}")
            check_int("expert", expert, low=0, high=router.num_experts - 1)
            handles.append(router.register_forward_hook(lambda m, i, out: _forced(out, expert)))
        yield
    finally:
        for h in handles:
            h.remove()


def _k_attribute(name: str, router: nn.Module) -> str:
    if isinstance(router, TopKRouter):
        return "k"
    if not isinstance(router, Router) and isinstance(getattr(router, "top_k", None), int):
        return "top_k"
    raise ValueError(
        f"cannot change k of {name!r} ({type(router).__name__}): supported are moekit top-k routers "
        "(TopKRouter and subclasses) and Hugging Face routers with an integer top_k"
    )


def _num_experts(router: nn.Module) -> int:
    return int(getattr(router, "num_experts", None) or router.weight.shape[0])


@contextmanager
def inference_k(model: nn.Module, k: int, *, layers: Iterable[str] | None = None) -> Iterator[None]:
    """Run the chosen layers (default: all) with ``k`` experts per token instead of their trained k."""
    targets = routed_layers(model, layers)
    check_int("k", k, low=1)
    plan = [(router, _k_attribute(name, router)) for name, router in targets.items()]
    for (router, _), name in zip(plan, targets):
        if k > _num_experts(router):
            raise ValueError(f"k must be <= num_experts ({_num_experts(router)}) of layer {name!r}, got k={k}")
    saved = [(router, attr, getattr(router, attr)) for router, attr in plan]
    try:
        for router, attr, _ in saved:
            setattr(router, attr, k)
        yield
    finally:
        for router, attr, old in saved:
            setattr(router, attr, old)


def accuracy_vs_k(
    model: nn.Module, evaluate: Evaluate, ks: Iterable[int], *, layers: Iterable[str] | None = None
) -> dict[int, float]:
    """``{k: evaluate(model)}`` with every chosen layer run at inference-time ``k``."""
    out = {}
    for k in ks:
        with inference_k(model, k, layers=layers):
            out[k] = float(evaluate(model))
    return out


def forced_expert_accuracy(model: nn.Module, evaluate: Evaluate, *, layer: str) -> list[float]:
    """``evaluate(model)`` with layer ``layer`` forced to each of its experts in turn: ``[E]``."""
    router = routed_layers(model, [layer])[layer]
    return [_eval_forced(model, evaluate, e, layer) for e in range(_num_experts(router))]


def _eval_forced(model: nn.Module, evaluate: Evaluate, expert: int, layer: str) -> float:
    with force_expert(model, expert, layers=[layer]):
        return float(evaluate(model))
