"""Merge the experts of a Hugging Face MoE model (M-SMoE, https://arxiv.org/abs/2310.01334).

calibrate (``calibrate_hf``) -> experts per block (``allocate_experts``) -> ``merge_layer`` per block
-> write the result back in the family's own tensor layout, in one of two forms:

* ``form="plain"``: each block has G experts and a router with G outputs (the rows of a group folded
  into one, see ``moekit.merging.merge.fold_router``); the config's expert count (and top-k, if it
  exceeded G) is updated. The result is a standard model of the same family: ``save_pretrained``
  writes it and stock ``from_pretrained`` loads it, with no moekit needed. A stock config has one
  expert count for all blocks, so the plain form needs ``budget="uniform"`` and no excluded blocks.
  Routing changes: a token now picks its top-k *groups* by the folded logits.
* ``form="exact"``: each block keeps its original router (E outputs, same decisions) and G experts;
  a ``RemappedRouter`` sends router output e to merged expert ``expert_map[e]`` (M-SMoE's redirect).
  Outputs equal those of the original model with every expert replaced by its group's merged expert.
  Blocks may keep different counts (global budget). Loading needs moekit: ``load_hf_model``.

Either way the merged tensors replace the originals, so ``save_pretrained`` writes a smaller checkpoint.
``model.config.moekit_merge`` records the form, method and per-block counts (saved in config.json).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Collection, Iterable

from torch import nn
from tqdm.auto import tqdm

from ..._checks import check_choice, check_int
from ...merging.dominant import allocate_experts
from ...merging.layer import merge_layer
from ...merging.model import BUDGETS, FORMS
from .base import family_for
from .routing import calibrate_hf

__all__ = ["merge_hf_model", "MERGE_CONFIG_KEY"]

#: config attribute (and config.json key) describing a moekit-merged model
MERGE_CONFIG_KEY = "moekit_merge"


def merge_hf_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    experts: int,
    method: str = "mcsmoe",
    form: str = "plain",
    budget: str | None = None,
    exclude: Collection[str] = (),
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_calib_tokens: int = 8192,
    inplace: bool = False,
    quiet: bool = False,
    **merge_kwargs: Any,
) -> nn.Module:
    """Merge every sparse MoE block of a Hugging Face model to fewer experts.

    Args:
        model: a model of a registered family (``moekit.integrations.hf.list_families()``).
        calib_batches: token ids ``[B, S]`` per batch (or what ``forward`` takes), e.g. a few hundred
            training sequences (paper: 256 samples of the target task).
        experts: experts kept per block (``budget="uniform"``) or on average (``"global"``); 1 <= experts <= E.
        method: a name in ``moekit.registry.MERGE_METHODS`` (``"mcsmoe"``, ``"prune"``, ``"uniform"``, ``"random"``).
        form: ``"plain"`` (stock-loadable, folded router) or ``"exact"`` (router unchanged, index map).
        budget: ``"global"`` (M-SMoE's adaptive counts; exact form only) or ``"uniform"``; default:
            ``"uniform"`` for the plain form, ``"global"`` for the exact form.
        exclude: block names left unmerged (exact form only), e.g. the first MoE block as in the paper.
        forward: ``forward(model, batch)`` for calibration (default: the family's, see ``calibrate_hf``).
        max_calib_tokens: router logits/inputs kept per block for grouping and router folding.
        inplace: modify ``model`` itself (saves memory) instead of a deep copy.
        quiet: no progress bars.
        merge_kwargs: passed to ``merge_layer`` (``grouping``, ``merge``, ``align``, ``anchor``, ``fold``, ``seed``).

    Returns the merged model (``model`` itself when ``inplace``), in eval/train mode as given.
    """
    check_choice("form", form, FORMS)
    budget = budget if budget is not None else ("uniform" if form == "plain" else "global")
    check_choice("budget", budget, BUDGETS)
    family = family_for(model)
    blocks = family.moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} ({family.name}) has no sparse MoE block to merge")
    if any(family.is_remapped(b) for b in blocks.values()):
        raise ValueError("this model is already merged (exact form); merge the original model instead")
    unknown = [n for n in exclude if n not in blocks]
    if unknown:
        raise ValueError(f"exclude names {unknown}, which are not MoE blocks; MoE blocks: {list(blocks)}")
    if form == "plain" and (budget != "uniform" or exclude):
        raise ValueError(
            "form='plain' needs budget='uniform' and no excluded blocks (a stock config has one expert count "
            f"for all blocks), got budget={budget!r}, exclude={list(exclude)}; use form='exact' for per-block counts"
        )
    merged_names = [n for n in blocks if n not in set(exclude)]
    if not merged_names:
        raise ValueError(f"exclude names every MoE block ({list(blocks)}); nothing to merge")
    smallest = min(family.num_experts(blocks[n]) for n in merged_names)
    check_int("experts", experts, low=1, high=smallest)

    need_inputs = merge_kwargs.get("grouping") == "expert_output"
    calib = calibrate_hf(
        model, calib_batches, forward=forward, max_tokens=max_calib_tokens, keep_inputs=need_inputs, quiet=quiet
    )
    freqs = {n: calib[n].frequency_E for n in blocks}
    if budget == "global":
        counts = allocate_experts(freqs, total=experts * len(merged_names), exclude=exclude)
    else:
        counts = allocate_experts(freqs, per_layer=experts, exclude=exclude)

    out = model if inplace else copy.deepcopy(model)
    new_blocks = family.moe_blocks(out)
    layers: dict[str, dict[str, int]] = {}
    bar = tqdm(merged_names, desc=f"merge ({method}, {form})", disable=quiet or not sys.stderr.isatty(), leave=False)
    for name in bar:
        block = new_blocks[name]
        E = family.num_experts(block)
        if counts[name] == E:
            continue  # nothing to merge: the block stays as it is
        c = calib[name]
        result = merge_layer(
            family.read_layer(block, out.config), c.frequency_E, c.logits_TE, counts[name], method=method,
            calib_inputs_TD=c.inputs_TD, **merge_kwargs,
        )  # fmt: skip
        family.write_experts(block, result.weights.params)
        if form == "plain":
            family.write_router(block, result.weights.router_weight, result.weights.router_bias)
        else:
            family.wrap_router(block, result.expert_map, counts[name])
        layers[name] = {"experts": counts[name], "router_outputs": E}
    if form == "plain":
        family.set_num_experts(out, experts)
    setattr(
        out.config,
        MERGE_CONFIG_KEY,
        {"form": form, "method": method, "experts": experts, "budget": budget, "layers": layers},
    )
    return out
