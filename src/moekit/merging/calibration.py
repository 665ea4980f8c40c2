"""Calibration statistics of a moekit model's MoE layers, read with the routing recorder.

M-SMoE (https://arxiv.org/abs/2310.01334, App. A2) uses a few hundred training samples to measure
each expert's activation frequency and the router logits that drive grouping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..layers.moe import MoE
from ..layers.remap import RemappedMoE
from ..stats import RoutingRecorder

__all__ = ["LayerCalibration", "moe_layers", "calibrate"]


@dataclass(frozen=True)
class LayerCalibration:
    """One layer's statistics: ``frequency_E`` (routed slots per expert), ``logits_TE`` (router logits
    of up to ``max_tokens`` tokens), ``inputs_TD`` (the layer's router inputs, when kept)."""

    frequency_E: Tensor
    logits_TE: Tensor
    inputs_TD: Tensor | None


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every moekit ``MoE`` / ``RemappedMoE`` in ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (MoE, RemappedMoE))}


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Iterable[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_tokens: int = 8192,
    keep_inputs: bool = False,
) -> dict[str, LayerCalibration]:
    """Run ``model`` (eval mode) over ``batches`` and collect statistics for each MoE layer.

    Args:
        layers: MoE layer names (default: all).
        forward: ``forward(model, batch)`` (default ``model(batch[0])`` for tuples, else ``model(batch)``).
        max_tokens: logits/inputs kept per layer (frequencies use every token).
        keep_inputs: also keep router inputs (needed by expert-output grouping).

    Raises ValueError naming every layer that the calibration data never reached.
    """
    found = moe_layers(model)
    names = list(found) if layers is None else list(layers)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"layers {missing} are not moekit MoE layers of the model; MoE layers: {list(found)}")
    if not names:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer to calibrate")
    inputs: dict[str, list[Tensor]] = {n: [] for n in names}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            have = sum(t.shape[0] for t in inputs[name])
            if have < max_tokens:
                inputs[name].append(args[0].detach().float().cpu()[: max_tokens - have])

        return hook

    handles = [found[n].router.register_forward_pre_hook(keep(n)) for n in names] if keep_inputs else []
    was_training = model.training
    model.eval()
    run = forward or _forward
    router_names = {f"{n}.router" if n else "router": n for n in names}
    try:
        with RoutingRecorder(model, layers=list(router_names), keep_logits=True, max_tokens=max_tokens) as rec:
            for batch in batches:
                run(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    never = [n for r, n in router_names.items() if r not in rec.stats or rec.stats[r].counts_E.sum() <= 0]
    if never:
        raise ValueError(f"the calibration data never reached MoE layers {never}; give batches that run through them")
    return {
        n: LayerCalibration(
            frequency_E=rec.stats[r].counts_E.clone(),
            logits_TE=rec.stats[r].logits_TE(),
            inputs_TD=torch.cat(inputs[n]) if keep_inputs else None,
        )
        for r, n in router_names.items()
    }


def _forward(model: nn.Module, batch: Any) -> Any:
    return model(batch[0]) if isinstance(batch, (tuple, list)) else model(batch)
