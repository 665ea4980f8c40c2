"""Permutation alignment of experts by weight matching (Git Re-Basin, https://arxiv.org/abs/2209.04836).

An expert's hidden units can be permuted without changing its function: for a two-layer MLP the rows
of ``up_proj`` (and ``up_bias``) and the columns of ``down_proj``; for a gated (SwiGLU) expert the gate
rows and the up rows of ``gate_up_proj`` *jointly* (unit i of the gate multiplies unit i of the up
projection) and the columns of ``down_proj``. Weight matching picks the permutation P maximising
``<W_anchor, P W_target>`` summed over every weight that touches the hidden axis -- a single linear
assignment problem, since an expert has only one permuted axis (M-SMoE, https://arxiv.org/abs/2310.01334,
Sec. 3.1; the official code aligns plain FFNs only, this also handles SwiGLU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int
from ..routers.local_search import hungarian
from .weights import ExpertLayerWeights

__all__ = ["matching_score", "weight_matching_permutation", "permute_experts", "align_experts"]


def _hidden_rows(kind: str, params: dict[str, Tensor], e: int) -> list[Tensor]:
    """Every weight of expert ``e`` as ``[F, *]`` with the hidden axis first."""
    down = params["down_proj"][e].t()  # [F, D]
    if kind == "mlp":
        rows = [params["up_proj"][e], down]
        if params.get("up_bias") is not None:
            rows.append(params["up_bias"][e].unsqueeze(1))
        return rows
    gate, up = params["gate_up_proj"][e].chunk(2, dim=0)
    rows = [gate, up, down]
    if params.get("up_bias") is not None:  # GPT-OSS: a bias per gate and per up unit
        gate_b, up_b = params["up_bias"][e].chunk(2)
        rows += [gate_b.unsqueeze(1), up_b.unsqueeze(1)]
    return rows


def matching_score(kind: str, params: dict[str, Tensor], anchor: int, target: int) -> Tensor:
    """``score[i, j]`` = inner product of anchor hidden unit i's weights with target unit j's: ``[F, F]`` fp64."""
    score = None
    for a, b in zip(_hidden_rows(kind, params, anchor), _hidden_rows(kind, params, target)):
        s = a.detach().double() @ b.detach().double().t()
        score = s if score is None else score + s
    assert score is not None
    return score


def weight_matching_permutation(kind: str, params: dict[str, Tensor], anchor: int, target: int) -> Tensor:
    """Permutation ``perm [F]`` (int64) such that target unit ``perm[i]`` is matched to anchor unit i."""
    return hungarian(matching_score(kind, params, anchor, target)).cpu()


def permute_experts(kind: str, params: dict[str, Tensor], perms: dict[int, Tensor]) -> dict[str, Tensor]:
    """Apply ``perms[e]`` to the hidden axis of expert ``e`` (others unchanged); returns new tensors."""
    out = {name: p.detach().clone() for name, p in params.items()}
    for e, perm in perms.items():
        perm = perm.to(out["down_proj"].device)
        out["down_proj"][e] = params["down_proj"][e][:, perm]
        if kind == "mlp":
            out["up_proj"][e] = params["up_proj"][e][perm]
            if "up_bias" in out:
                out["up_bias"][e] = params["up_bias"][e][perm]
        else:
            hidden = params["down_proj"].shape[-1]
            both = torch.cat([perm, perm + hidden])
            out["gate_up_proj"][e] = params["gate_up_proj"][e][both]
            if "up_bias" in out:
                out["up_bias"][e] = params["up_bias"][e][both]
    return out


def align_experts(weights: ExpertLayerWeights, anchors_E: Tensor | int) -> ExpertLayerWeights:
    """Align every expert to an anchor expert by weight matching.

    Args:
        weights: the layer (kind ``"mlp"`` or ``"glu"``).
        anchors_E: one anchor id for all experts (the paper uses expert 0), or ``[E]`` the anchor of
            each expert (e.g. its group's dominant expert). An expert that is its own anchor is unchanged.

    Returns:
        The same layer with permuted hidden units; every expert computes exactly the same function.
    """
    E = weights.num_experts
    if isinstance(anchors_E, int):
        check_int("anchor", anchors_E, low=0, high=E - 1)
        anchors_E = torch.full((E,), anchors_E, dtype=torch.long)
    if anchors_E.shape != (E,) or (anchors_E < 0).any() or (anchors_E >= E).any():
        raise ValueError(f"anchors_E must be [E={E}] ids in [0, {E}), got {anchors_E.tolist()}")
    perms = {
        e: weight_matching_permutation(weights.kind, weights.params, int(anchors_E[e]), e)
        for e in range(E)
        if int(anchors_E[e]) != e
    }
    return weights.replace(params=permute_experts(weights.kind, weights.params, perms))
