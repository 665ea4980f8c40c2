"""Routing statistics of Hugging Face MoE models with moekit's ``RoutingRecorder``.

    from moekit import RoutingRecorder
    from moekit.integrations.hf import routing_sources

    with RoutingRecorder(model, sources=routing_sources(model), keep_logits=True) as rec:
        model(input_ids=ids)
    rec.metrics()   # {"model.layers.0.mlp": RoutingMetrics, ...}

Layers are named by their MoE block (e.g. ``model.layers.0.mlp``); exact-form merged blocks report
their original router's E outputs.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...merging.calibration import LayerCalibration
from ...stats import RoutingRecorder
from ...types import RoutingDecision
from .base import family_for

__all__ = ["routing_sources", "calibrate_hf"]


def routing_sources(model: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Any], RoutingDecision]]]:
    """``{MoE block name: (router module, router output -> RoutingDecision)}`` for ``RoutingRecorder``.

    Raises ValueError for a model whose ``config.model_type`` has no registered family.
    """
    family = family_for(model)
    blocks = family.moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} ({family.name}) has no sparse MoE block")
    return {name: (family.router(block), family.decision) for name, block in blocks.items()}


@torch.no_grad()
def calibrate_hf(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_tokens: int = 8192,
    keep_inputs: bool = False,
    quiet: bool = True,
) -> dict[str, LayerCalibration]:
    """Run ``model`` (eval mode) over ``batches`` and collect each MoE block's calibration statistics.

    Args:
        batches: token ids ``[B, S]`` (or anything ``forward`` accepts).
        forward: ``forward(model, batch)``; default: the family's ``forward_tokens`` (decoder-only:
            ``model(input_ids=ids)``; Switch: encoder ids and ``labels=ids`` for the decoder).
        max_tokens: router logits (and inputs) kept per layer; frequencies use every token.
        keep_inputs: also keep the router inputs ``[T, D]`` (for expert-output grouping).
        quiet: no progress bar.

    Returns ``{block name: LayerCalibration(frequency_E, logits_TE, inputs_TD)}``.
    Raises ValueError naming every block that no calibration token reached.
    """
    family = family_for(model)
    sources = routing_sources(model)
    inputs: dict[str, list[Tensor]] = {name: [] for name in sources}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            have = sum(t.shape[0] for t in inputs[name])
            if have < max_tokens:
                x = args[0].detach()
                inputs[name].append(x.reshape(-1, x.shape[-1]).float().cpu()[: max_tokens - have])

        return hook

    handles = [router.register_forward_pre_hook(keep(n)) for n, (router, _) in sources.items()] if keep_inputs else []
    run = forward or family.forward_tokens
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(model, sources=sources, layers=list(sources), keep_logits=True, max_tokens=max_tokens)
    try:
        with recorder as rec:
            for batch in tqdm(batches, desc="calibrate", disable=quiet or not sys.stderr.isatty(), leave=False):
                run(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    never = [n for n in sources if n not in rec.stats or rec.stats[n].counts_E.sum() <= 0]
    if never:
        raise ValueError(f"the calibration data never reached MoE blocks {never}; give batches that run through them")
    return {
        n: LayerCalibration(
            frequency_E=rec.stats[n].counts_E.clone(),
            logits_TE=rec.stats[n].logits_TE(),
            inputs_TD=torch.cat(inputs[n]) if keep_inputs else None,
        )
        for n in sources
    }
