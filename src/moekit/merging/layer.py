"""``merge_layer``: one MoE layer's E experts -> G merged experts, by a registered method.

A method (``moekit.registry.MERGE_METHODS``) is a recipe of three choices -- how experts are grouped,
whether they are permutation-aligned first, and how a group becomes one expert. Keyword arguments of
``merge_layer`` override the recipe, so ablations need no new method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..registry import MERGE_METHODS
from .align import align_experts
from .dominant import check_frequency, dominant_experts
from .grouping import GROUPINGS, group_by_expert_output, group_by_router_logits, group_randomly
from .merge import fold_router, merge_groups
from .weights import ExpertLayerWeights, LayerMergeResult

__all__ = ["MergeRecipe", "MERGES", "merge_layer", "list_merge_methods"]

#: how a group becomes one expert: frequency-weighted / uniform average, or the dominant expert alone
MERGES = ("frequency", "uniform", "dominant")
MSMOE = "https://arxiv.org/abs/2310.01334"


@dataclass(frozen=True)
class MergeRecipe:
    """Defaults of a merge method: ``grouping`` in GROUPINGS, ``merge`` in MERGES, ``align`` on/off."""

    grouping: str
    merge: str
    align: bool


@MERGE_METHODS.register("mcsmoe", paper=MSMOE, summary="M-SMoE: align, router-logit grouping, frequency-weighted merge")
def _mcsmoe() -> MergeRecipe:
    return MergeRecipe(grouping="router_logits", merge="frequency", align=True)


@MERGE_METHODS.register("prune", paper=MSMOE, summary="keep only the dominant experts; the others redirect to them")
def _prune() -> MergeRecipe:
    return MergeRecipe(grouping="router_logits", merge="dominant", align=False)


@MERGE_METHODS.register("uniform", paper=MSMOE, summary="M-SMoE with uniform instead of frequency-weighted averaging")
def _uniform() -> MergeRecipe:
    return MergeRecipe(grouping="router_logits", merge="uniform", align=True)


@MERGE_METHODS.register("random", paper=MSMOE, summary="M-SMoE with random instead of router-logit grouping")
def _random() -> MergeRecipe:
    return MergeRecipe(grouping="random", merge="frequency", align=True)


def list_merge_methods() -> list[str]:
    return MERGE_METHODS.names()


def first_members(groups_E: Tensor, num_groups: int) -> Tensor:
    """The lowest expert id of each group: ``groups_E [E]`` (group of each expert) -> ``[G]``."""
    E = groups_E.shape[0]
    ids = torch.arange(E, dtype=torch.long)
    return torch.full((num_groups,), E, dtype=torch.long).scatter_reduce(0, groups_E.long(), ids, "amin")


def merge_layer(
    weights: ExpertLayerWeights,
    frequency_E: Tensor,
    router_logits_TE: Tensor | None,
    num_groups: int,
    *,
    method: str = "mcsmoe",
    grouping: str | None = None,
    merge: str | None = None,
    align: bool | None = None,
    anchor: str | int = "dominant",
    calib_inputs_TD: Tensor | None = None,
    fold: str = "lse",
    seed: int = 0,
) -> LayerMergeResult:
    """Merge one layer's E experts into ``num_groups`` (G) experts.

    Steps: dominant experts = the G most frequently activated; every other expert joins one
    dominant expert (``grouping``); members are permutation-aligned (``align``, to ``anchor``); each
    group is averaged (``merge``); the router is folded to G rows for the plain form (``fold``).

    Args:
        weights: the layer's experts and router (``ExpertLayerWeights``, E experts).
        frequency_E: activation counts/frequencies of each expert on calibration data ``[E]``.
        router_logits_TE: router logits on calibration tokens ``[T, E]`` (needed by router-logit
            grouping and by ``fold="lse"``).
        num_groups: G, 1 <= G <= E.
        method: a name in ``MERGE_METHODS``: ``"mcsmoe"``, ``"prune"``, ``"uniform"``, ``"random"``.
        grouping: override: ``"router_logits"``, ``"expert_output"`` (needs ``calib_inputs_TD``), ``"random"``.
        merge: override: ``"frequency"``, ``"uniform"`` or ``"dominant"`` (keep the dominant expert only).
        align: override: permutation-align group members before averaging.
        anchor: ``"dominant"`` aligns each expert to its group's dominant expert; ``"first"`` to its
            group's lowest-id member (the official MC-SMoE code: ``expert_indices[0]`` of each group); an
            int aligns every expert to that expert id.
        calib_inputs_TD: the layer's inputs on calibration tokens ``[T, D]`` (expert-output grouping).
        fold: plain-form router fold, ``"lse"`` or ``"dominant"`` (see ``moekit.merging.merge``).
        seed: seed of random grouping.

    Returns:
        ``LayerMergeResult``: ``weights`` holds the G merged experts and the folded router ``[G, D]``
        (plain form); ``expert_map [E]`` sends original router output e to merged expert
        ``expert_map[e]`` (exact form); ``dominant [G]`` the original id leading each group.
        Group g is led by ``dominant[g]``; groups are ordered by their dominant's id.
    """
    if not isinstance(weights, ExpertLayerWeights):
        raise TypeError(f"weights must be ExpertLayerWeights, got {type(weights).__name__}")
    E = weights.num_experts
    check_int("num_groups", num_groups, low=1, high=E)
    frequency = check_frequency("frequency_E", frequency_E, E)
    recipe: MergeRecipe = MERGE_METHODS.get(method)()
    grouping = check_choice("grouping", grouping if grouping is not None else recipe.grouping, GROUPINGS)
    merge = check_choice("merge", merge if merge is not None else recipe.merge, MERGES)
    align = recipe.align if align is None else bool(align)
    if router_logits_TE is not None and (router_logits_TE.dim() != 2 or router_logits_TE.shape[1] != E):
        raise ValueError(f"router_logits_TE must be [T, E={E}], got {tuple(router_logits_TE.shape)}")

    dominant_G = dominant_experts(frequency, num_groups)
    if grouping == "router_logits":
        if router_logits_TE is None:
            raise ValueError("grouping='router_logits' needs router_logits_TE [T, E] from calibration data")
        groups_E = group_by_router_logits(router_logits_TE, dominant_G)
    elif grouping == "expert_output":
        groups_E = group_by_expert_output(weights, calib_inputs_TD, dominant_G)  # type: ignore[arg-type]
    else:
        groups_E = group_randomly(E, dominant_G, seed=seed)

    if align and merge != "dominant":
        if anchor == "dominant":
            weights = align_experts(weights, dominant_G[groups_E])
        elif anchor == "first":
            weights = align_experts(weights, first_members(groups_E, num_groups)[groups_E])
        elif isinstance(anchor, int) and not isinstance(anchor, bool):
            weights = align_experts(weights, anchor)
        else:
            raise ValueError(f"anchor must be 'dominant', 'first' or an expert id in [0, {E}), got {anchor!r}")

    if merge == "dominant":
        params = {name: p.detach()[dominant_G].clone() for name, p in weights.params.items()}
    else:
        alpha = frequency if merge == "frequency" else torch.ones(E, dtype=torch.float64)
        params = merge_groups(weights.params, groups_E, num_groups, alpha)
    router_w, router_b = fold_router(
        weights.router_weight, weights.router_bias, groups_E, dominant_G, router_logits_TE, how=fold
    )
    extras = {name: t.detach()[dominant_G].clone() for name, t in weights.router_extras.items()}
    merged = weights.replace(params=params, router_weight=router_w, router_bias=router_b, router_extras=extras)
    return LayerMergeResult(weights=merged, expert_map=groups_E, dominant=dominant_G)
