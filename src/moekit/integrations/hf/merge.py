"""``merge_hf_model``: M-SMoE on a Hugging Face MoE model in memory (https://arxiv.org/abs/2310.01334).

A thin front over the compression pipeline (``moekit.merging.pipeline``) with the paper's semantics:
statistics of the unmerged model (``propagate="original"``), then ``merge_layer`` per block, written
back in the family's own tensor layout, in one of two forms:

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
from typing import Any, Callable, Collection, Iterable

from torch import nn

from ...merging.methods.spec import front_spec
from ...merging.pipeline import run_pipeline
from .base import family_for
from .stack import MERGE_CONFIG_KEY, hf_stack

__all__ = ["merge_hf_model", "MERGE_CONFIG_KEY"]


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
    protect_super_experts: bool = True,
    quiet: bool = False,
    **merge_kwargs: Any,
) -> nn.Module:
    """Merge every sparse MoE block of a Hugging Face model to fewer experts.

    Args:
        model: a model of a registered family (``moekit.integrations.hf.list_families()``).
        calib_batches: token ids ``[B, S]`` per batch (or what ``forward`` takes), e.g. a few hundred
            training sequences (paper: 256 samples of the target task).
        experts: experts kept per block (``budget="uniform"``) or on average (``"global"``); 1 <= experts <= E.
        method: a recipe in ``moekit.registry.MERGE_METHODS`` (``"mcsmoe"``, ``"prune"``, ``"uniform"``, ``"random"``)
            or another ``EXPERT_METHODS`` name (``"reap"``, ``"hc-smoe"``, ...).
        protect_super_experts: keep super experts (methods that support it; not M-SMoE).
        form: ``"plain"`` (stock-loadable, folded router) or ``"exact"`` (router unchanged, index map).
        budget: ``"global"`` (M-SMoE's adaptive counts; exact form only) or ``"uniform"``; default:
            ``"uniform"`` for the plain form, ``"global"`` for the exact form.
        exclude: block names left unmerged (exact form only), e.g. the first MoE block as in the paper.
        forward: ``forward(model, batch)`` for calibration; the whole model then runs as one unit
            (default: decoder-only families layer by layer on token ids, Switch as one unit).
        max_calib_tokens: router logits/inputs kept per block for grouping and router folding.
        inplace: modify ``model`` itself (saves memory) instead of a deep copy.
        quiet: no progress bars.
        merge_kwargs: passed to ``merge_layer`` (``grouping``, ``merge``, ``align``, ``anchor``, ``fold``, ``seed``).

    Returns the merged model (``model`` itself when ``inplace``), in eval/train mode as given.
    """
    family = family_for(model)
    spec = front_spec(method, merge_kwargs, experts=experts, budget=budget or ("uniform" if form == "plain" else "global"),
                      form=form, exclude=exclude, max_tokens=max_calib_tokens,
                      protect_super_experts=protect_super_experts)  # fmt: skip
    if not family.blocks(model):
        raise ValueError(f"{type(model).__name__} ({family.name}) has no sparse MoE block to merge")
    out = model if inplace else copy.deepcopy(model)
    was_training = out.training
    run_pipeline(hf_stack(out.eval(), forward), calib_batches, spec, quiet=quiet)
    return out.train(was_training)
