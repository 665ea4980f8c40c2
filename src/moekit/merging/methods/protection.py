"""Super experts (Su et al., 2025, https://arxiv.org/abs/2507.23279): the few experts whose
``down_proj`` output has massive activation outliers. Removing them makes the model degenerate
(repetitive text), so pruning and merging methods keep them (``--protect-super-experts``).

Rule (the paper's code, ``eval_utils.py``): per expert, the largest ``|y|`` of its down_proj output
over the calibration tokens routed to it (statistic ``down_proj_extremes``); an expert is a super
expert when that maximum exceeds both the 99.5th percentile of the maxima of all experts of the
considered layers and a tenth of their largest maximum. Only the first 75% of the MoE layers are
considered (``include_layers=0.75``; REAP's ``--perserve_super_experts`` does the same). Differences
from REAP's copy: REAP takes the signed maximum; we take ``|y|`` as the Super Experts code does.
Percentiles use linear interpolation (``torch.quantile``), so on small models the largest outlier
always exceeds the 99.5th percentile and the ``max / 10`` condition decides alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["SUPER_EXPERT_STATISTIC", "PERCENTILE", "MAX_FRACTION", "LAYER_FRACTION", "super_experts", "protected_mask"]

SUPER_EXPERT_STATISTIC = "down_proj_extremes"
PERCENTILE = 99.5
MAX_FRACTION = 0.1
LAYER_FRACTION = 0.75


def super_experts(
    extremes: Mapping[str, Mapping[str, Tensor]],
    order: Sequence[str],
    *,
    percentile: float = PERCENTILE,
    max_fraction: float = MAX_FRACTION,
    layer_fraction: float = LAYER_FRACTION,
) -> dict[str, list[int]]:
    """``{block: sorted expert ids}`` of the super experts among the blocks ``order`` (forward order).

    Args:
        extremes: per block the ``down_proj_extremes`` statistic (key ``abs_max [E]``).
        order: the blocks in forward order; the first ``int(len(order) * layer_fraction)`` (at least
            one) are considered, the others never hold a super expert.
    """
    considered = list(order)[: max(1, int(len(order) * layer_fraction))]
    if not considered:
        return {}
    maxima = torch.cat([extremes[n]["abs_max"].double().flatten() for n in considered])
    if maxima.numel() == 0 or float(maxima.max()) <= 0:
        return {n: [] for n in order}
    threshold = max(float(torch.quantile(maxima, percentile / 100)), float(maxima.max()) * max_fraction)
    out = {n: [] for n in order}
    for n in considered:
        out[n] = [int(i) for i in torch.nonzero(extremes[n]["abs_max"].double() > threshold).flatten()]
    return out


def protected_mask(stats: Mapping[str, Mapping[str, Tensor]], num_experts: int) -> Tensor:
    """``[E]`` bool: the experts the pipeline marked protected in a block's statistics (none if absent)."""
    mask = stats.get("protected", {}).get("mask")
    return torch.zeros(num_experts, dtype=torch.bool) if mask is None else mask.bool().cpu()
