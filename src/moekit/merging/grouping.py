"""Grouping: attach every non-dominant expert to one dominant expert.

All functions return ``groups_E`` (int64 ``[E]``): the group of each expert, where group g is led by
``dominant_G[g]`` (each dominant expert is in its own group).

* ``router_logits`` -- M-SMoE (https://arxiv.org/abs/2310.01334, Eq. 1): cosine similarity of the
  experts' router-logit columns over calibration tokens; the most similar dominant expert wins.
* ``expert_output`` -- HC-SMoE (https://arxiv.org/abs/2410.08589): each expert is represented by its
  mean output over the calibration tokens; the nearest dominant expert (Euclidean) wins.
* ``random`` -- the random-grouping baseline: a uniformly random dominant expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..experts.base import activation_fn
from .weights import ExpertLayerWeights, glu_hidden

__all__ = ["GROUPINGS", "group_by_router_logits", "group_by_expert_output", "group_randomly", "expert_outputs"]

GROUPINGS = ("router_logits", "expert_output", "random")


def _assign(similarity_EG: Tensor, dominant_G: Tensor) -> Tensor:
    groups_E = similarity_EG.argmax(dim=1)
    groups_E[dominant_G] = torch.arange(dominant_G.shape[0])
    return groups_E.long()


def group_by_router_logits(router_logits_TE: Tensor, dominant_G: Tensor) -> Tensor:
    """Most cosine-similar dominant router-logit column (over the T calibration tokens) per expert."""
    if router_logits_TE.dim() != 2 or router_logits_TE.shape[0] == 0:
        raise ValueError(
            f"router_logits_TE must be [T, E] with T >= 1 calibration tokens, got {tuple(router_logits_TE.shape)}"
        )
    cols_ET = F.normalize(router_logits_TE.detach().double().cpu().t(), dim=1)
    return _assign(cols_ET @ cols_ET[dominant_G].t(), dominant_G)


@torch.no_grad()
def expert_outputs(weights: ExpertLayerWeights, x_TD: Tensor) -> Tensor:
    """Every expert of the layer on every token: ``[E, T, D]`` (plain ops, fp32)."""
    p = {name: t.detach().float() for name, t in weights.params.items()}
    x = x_TD.detach().float().to(p["down_proj"].device)
    h = torch.einsum("td,efd->etf", x, p["gate_up_proj" if weights.kind == "glu" else "up_proj"])
    if "up_bias" in p:
        h = h + p["up_bias"][:, None]
    if weights.kind == "glu":
        h = glu_hidden(h, weights.activation, weights.activation_params)
    else:
        h = activation_fn(weights.activation)(h)
    y = torch.einsum("etf,edf->etd", h, p["down_proj"])
    if "down_bias" in p:
        y = y + p["down_bias"][:, None]
    return y


def group_by_expert_output(weights: ExpertLayerWeights, calib_inputs_TD: Tensor, dominant_G: Tensor) -> Tensor:
    """Nearest dominant expert by the Euclidean distance of mean outputs on ``calib_inputs_TD [T, D]``."""
    if calib_inputs_TD is None or calib_inputs_TD.dim() != 2 or calib_inputs_TD.shape[0] == 0:
        shape = None if calib_inputs_TD is None else tuple(calib_inputs_TD.shape)
        raise ValueError(f"grouping='expert_output' needs calib_inputs_TD of shape [T>=1, D], got {shape}")
    mean_ED = expert_outputs(weights, calib_inputs_TD).mean(dim=1).double().cpu()
    return _assign(-torch.cdist(mean_ED, mean_ED[dominant_G]), dominant_G)


def group_randomly(num_experts: int, dominant_G: Tensor, *, seed: int = 0) -> Tensor:
    """Each non-dominant expert joins a uniformly random dominant expert (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    G = dominant_G.shape[0]
    return _assign(torch.rand(num_experts, G, generator=gen, dtype=torch.float64), dominant_G)
