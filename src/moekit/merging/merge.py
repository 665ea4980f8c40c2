"""Merging a group of experts into one, and folding the router for the plain output form.

``merge_groups``: the merged expert of group g is ``sum_i a_i W_i / sum_i a_i`` over its (aligned)
members, applied to every expert tensor; ``a_i`` = activation frequency (M-SMoE Eq. 2,
https://arxiv.org/abs/2310.01334) or 1 (uniform averaging). A group whose weights are all zero
(never-used experts) is averaged uniformly.

``fold_router`` (plain form): the router must end with one row per group. No linear row can give
``log sum_{e in g} exp(logit_e)`` -- the logit whose softmax is the group's total probability mass --
because log-sum-exp of linear functions is not linear. ``how="lse"`` therefore fits, on the
calibration tokens, the row in the span of the group's rows (plus an intercept when the router has a
bias) whose logit is closest in least squares to that log-sum-exp: ``row_g = sum_e c_e w_e`` with
``c = argmin ||L_g c - lse(L_g)||^2`` (ridge-stabilised), computable from the logits alone. Singleton
groups keep their row exactly. ``how="dominant"`` keeps the dominant expert's row (pruning semantics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice

__all__ = ["merge_groups", "fold_router", "FOLDS"]

FOLDS = ("lse", "dominant")
#: float64 bytes of the expert columns ``merge_groups`` sums at a time (8 MiB): whole float64 copies of
#: a bank are 2x its fp32 bytes and were the merge's memory peak; the split depends only on the shape,
#: so a run and its resume sum the same way
MERGE_CHUNK_BYTES = 8 << 20


def merge_groups(params: dict[str, Tensor], groups_E: Tensor, num_groups: int, alpha_E: Tensor) -> dict[str, Tensor]:
    """Weighted average of every expert tensor within each group: ``{name: [G, ...]}``.

    Args:
        params: stacked expert tensors ``[E, ...]``.
        groups_E: int64 group of each expert, values in ``[0, num_groups)``.
        alpha_E: non-negative merge weight of each expert.

    The sums are float64, over ``MERGE_CHUNK_BYTES`` of columns at a time, rounded to each tensor's dtype.
    """
    groups_E = groups_E.cpu().long()
    alpha = alpha_E.detach().to("cpu", torch.float64).clamp_min(0)
    one_hot_GE = torch.zeros(num_groups, groups_E.shape[0], dtype=torch.float64)
    one_hot_GE[groups_E, torch.arange(groups_E.shape[0])] = 1.0
    mix_GE = one_hot_GE * alpha
    empty = mix_GE.sum(1) <= 0
    mix_GE[empty] = one_hot_GE[empty]  # all-zero weights: uniform over the group
    mix_GE = mix_GE / mix_GE.sum(1, keepdim=True)
    out = {}
    for name, p in params.items():
        flat = p.detach().reshape(p.shape[0], -1)
        merged = torch.empty(num_groups, flat.shape[1], dtype=p.dtype, device=flat.device)
        mix = mix_GE.to(flat.device)
        step = max(1, MERGE_CHUNK_BYTES // (8 * max(1, flat.shape[0])))
        for c in range(0, flat.shape[1], step):  # float64 over a few columns at a time
            merged[:, c : c + step] = mix @ flat[:, c : c + step].double()
        out[name] = merged.reshape(num_groups, *p.shape[1:])
    return out


def fold_router(
    router_weight_ED: Tensor,
    router_bias_E: Tensor | None,
    groups_E: Tensor,
    dominant_G: Tensor,
    router_logits_TE: Tensor | None,
    *,
    how: str = "lse",
    ridge: float = 1e-4,
) -> tuple[Tensor, Tensor | None]:
    """Router with one row per group: ``([G, D], [G] or None)``; see the module docstring."""
    check_choice("fold", how, FOLDS)
    G = dominant_G.shape[0]
    weight = router_weight_ED.detach()
    bias = None if router_bias_E is None else router_bias_E.detach()
    if how == "dominant":
        return weight[dominant_G].clone(), None if bias is None else bias[dominant_G].clone()
    if router_logits_TE is None or router_logits_TE.dim() != 2 or router_logits_TE.shape[0] == 0:
        raise ValueError("fold='lse' needs router_logits_TE [T>=1, E] from the calibration data")
    logits = router_logits_TE.detach().to("cpu", torch.float64)
    rows, biases = [], []
    for g in range(G):
        members = torch.nonzero(groups_E.cpu() == g).flatten()
        if members.numel() == 1:
            rows.append(weight[members[0]].double().cpu())
            biases.append(None if bias is None else bias[members[0]].double().cpu())
            continue
        L = logits[:, members]
        target = torch.logsumexp(L, dim=1)
        A = torch.cat([L, torch.ones_like(target)[:, None]], dim=1) if bias is not None else L
        gram = A.t() @ A
        reg = ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(A.shape[1], dtype=torch.float64)
        c = torch.linalg.solve(gram + reg, A.t() @ target)
        coef = c[: members.numel()]
        rows.append(coef @ weight[members].double().cpu())
        if bias is not None:
            biases.append(coef @ bias[members].double().cpu() + c[-1])
    folded_w = torch.stack(rows).to(weight.dtype).to(weight.device)
    folded_b = None if bias is None else torch.stack(biases).to(bias.dtype).to(bias.device)
    return folded_w, folded_b
