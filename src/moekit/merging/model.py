"""Merge every MoE layer of a moekit model (M-SMoE pipeline, https://arxiv.org/abs/2310.01334).

calibrate -> allocate experts per layer -> ``merge_layer`` per layer -> rebuild each layer in the
exact form (``RemappedMoE``: router unchanged, index map) or the plain form (a smaller ``MoE`` whose
router has one folded row per group). The input model is never modified.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Collection, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_choice, check_int
from ..experts.mlp import GLUExperts, MLPExperts
from ..layers.moe import MoE
from ..layers.remap import RemappedMoE
from ..routers.topk import TopKRouter
from .calibration import calibrate, moe_layers
from .dominant import allocate_experts
from .layer import merge_layer
from .weights import ExpertLayerWeights, LayerMergeResult

__all__ = ["FORMS", "BUDGETS", "read_moe_layer", "build_merged_layer", "merge_moekit_model"]

FORMS = ("exact", "plain")
BUDGETS = ("global", "uniform")


def read_moe_layer(moe: nn.Module) -> ExpertLayerWeights:
    """A moekit ``MoE`` with an ``mlp``/``glu`` bank and a linear-gate router (top-k, Switch) as
    ``ExpertLayerWeights``."""
    if isinstance(moe, RemappedMoE):
        raise ValueError("this layer is already merged (RemappedMoE); merge the original model instead")
    if not isinstance(moe, MoE):
        raise TypeError(f"expected a moekit MoE layer, got {type(moe).__name__}")
    if not isinstance(moe.router, TopKRouter):
        raise ValueError(f"merging needs a linear-gate router (topk, switch), got {type(moe.router).__name__}")
    bank = moe.experts
    if isinstance(bank, GLUExperts):
        kind = "glu"
    elif isinstance(bank, MLPExperts):
        kind = "mlp"
    else:
        raise ValueError(f"merging supports 'mlp' and 'glu' expert banks, got {type(bank).__name__}")
    params = {name: p.detach() for name, p in bank.stacked_parameters().items()}
    return ExpertLayerWeights(kind, params, moe.router.gate.weight.detach(), None, bank.activation)


def _bank(bank: nn.Module, result: LayerMergeResult) -> nn.Module:
    new = copy.deepcopy(bank)
    for name, tensor in result.weights.params.items():
        setattr(new, name, nn.Parameter(tensor.clone().to(getattr(bank, name).device)))
    new.num_experts = int(result.dominant.shape[0])
    return new


def build_merged_layer(moe: MoE, result: LayerMergeResult, form: str) -> nn.Module:
    """The merged layer: ``RemappedMoE`` (exact) or a ``MoE`` with a folded router (plain)."""
    check_choice("form", form, FORMS)
    bank = _bank(moe.experts, result)
    G = bank.num_experts
    if form == "exact":
        router = copy.deepcopy(moe.router)
        return RemappedMoE(router, bank, result.expert_map.to(bank.down_proj.device), combine=moe.combine)
    if moe.router.balancer is not None:
        raise ValueError("form='plain' cannot fold a router with a balancer; use form='exact'")
    router = copy.deepcopy(moe.router)
    gate = result.weights.router_weight.to(moe.router.gate.weight)
    router.gate.weight = nn.Parameter(gate.clone())
    if router.noise is not None:  # training-time noise scales: mean over each group's rows
        mix = torch.zeros(G, moe.router.num_experts, dtype=gate.dtype, device=gate.device)
        mix[result.expert_map.to(gate.device), torch.arange(moe.router.num_experts, device=gate.device)] = 1.0
        router.noise.weight = nn.Parameter((mix / mix.sum(1, keepdim=True)) @ moe.router.noise.weight.detach())
    router.num_experts, router.k = G, min(router.k, G)
    return MoE(router, bank, combine=moe.combine)


def merge_moekit_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    experts: int,
    method: str = "mcsmoe",
    form: str = "exact",
    budget: str = "global",
    exclude: Collection[str] = (),
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_calib_tokens: int = 8192,
    quiet: bool = False,
    **merge_kwargs: Any,
) -> nn.Module:
    """A merged copy of a moekit model (``model`` itself is not modified).

    Args:
        model: any module containing moekit ``MoE`` layers (mlp/glu banks, top-k or Switch routers).
        calib_batches: calibration batches (e.g. a few hundred training sequences).
        experts: average experts kept per merged layer (``budget="global"``: a shared budget of
            ``experts * merged layers``, each layer's count set by normalised frequencies, the most-used
            expert always kept; ``"uniform"``: exactly this many per layer). 1 <= experts <= E.
        method: a name in ``MERGE_METHODS`` (``"mcsmoe"``, ``"prune"``, ``"uniform"``, ``"random"``).
        form: ``"exact"`` (router unchanged, index map) or ``"plain"`` (router folded, standard MoE).
        exclude: MoE layer names (``moekit.merging.calibration.moe_layers``) left unmerged.
        forward: ``forward(model, batch)`` for calibration (default ``model(batch)``).
        max_calib_tokens: router logits/inputs kept per layer for grouping.
        quiet: no progress bar.
        merge_kwargs: passed to ``merge_layer`` (``grouping``, ``merge``, ``align``, ``anchor``, ``fold``, ``seed``).
    """
    check_choice("form", form, FORMS)
    check_choice("budget", budget, BUDGETS)
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer to merge")
    unknown = [n for n in exclude if n not in layers]
    if unknown:
        raise ValueError(f"exclude names {unknown}, which are not MoE layers; MoE layers: {list(layers)}")
    weights = {name: read_moe_layer(moe) for name, moe in layers.items()}
    merged_names = [n for n in layers if n not in set(exclude)]
    smallest = min((weights[n].num_experts for n in merged_names), default=1)
    check_int("experts", experts, low=1, high=smallest)
    need_inputs = merge_kwargs.get("grouping") == "expert_output"
    if not merged_names:
        return copy.deepcopy(model)
    calib = calibrate(
        model, calib_batches, layers=merged_names, forward=forward, max_tokens=max_calib_tokens, keep_inputs=need_inputs
    )
    freqs = {n: calib[n].frequency_E for n in merged_names}
    if budget == "global":
        counts = allocate_experts(freqs, total=experts * len(merged_names))
    else:
        counts = allocate_experts(freqs, per_layer=experts)
    out = copy.deepcopy(model)
    new_layers = moe_layers(out)
    bar = tqdm(merged_names, desc=f"merge ({method}, {form})", disable=quiet or not sys.stderr.isatty(), leave=False)
    for name in bar:
        if counts[name] == weights[name].num_experts:
            continue  # nothing to merge: keep the layer as it is
        c = calib[name]
        result = merge_layer(
            weights[name], c.frequency_E, c.logits_TE, counts[name], method=method, calib_inputs_TD=c.inputs_TD,
            **merge_kwargs,
        )
        merged = build_merged_layer(new_layers[name], result, form)
        if name:
            _set_module(out, name, merged)
        else:
            out = merged  # the model is itself one MoE layer
    return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
