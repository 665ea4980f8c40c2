"""Padding a reduced block with experts its router never chooses (plain form, per-block counts).

A stock Hugging Face config holds one expert count for every block, so a global budget's per-block
counts G_l fit the plain form only when every block has ``max_l G_l`` experts. ``pad_result`` appends
``size - G`` zero experts whose router rows are zero and whose routing bias is ``PAD_BIAS``:

* routers with a bias on their logits (``selection_bias="router_bias"``: GPT-OSS, Switch with
  ``router_bias``): a padding expert's logit is ``-1e4``, so it is never in the top-k and its softmax
  mass is ``exp(-1e4) = 0``;
* sigmoid routers with a selection bias (DeepSeek-V3 ``e_score_correction_bias``): its choice score is
  ``sigmoid(0) - 1e4``, below every real expert's (scores are independent, so the real experts' gates
  do not change).

Either way the padded block computes what the unpadded one does (as long as no real logit or biased
score is below -1e4). Routers without such a bias, group-limited routers, and softmax routers whose
bias acts on probabilities (ERNIE: padding would take softmax mass and change the choice) are refused.
The cost: the padding experts' zero tensors on disk and in memory (``padding_bytes``).
"""

from __future__ import annotations

import torch

from .weights import LayerMergeResult, RoutingSpec

__all__ = ["PAD_BIAS", "can_pad", "pad_result"]

PAD_BIAS = -1.0e4


def can_pad(routing: RoutingSpec) -> str | None:
    """None if blocks that route like ``routing`` can be padded, else the reason why not."""
    if routing.groups > 1:
        return f"group-limited routing (n_group={routing.groups}) would need padding experts in every group"
    if routing.selection_bias == "router_bias" or (routing.score == "sigmoid" and routing.selection_bias):
        return None
    if routing.selection_bias:
        return f"its {routing.selection_bias} acts on softmax probabilities (padding experts would take softmax mass)"
    return "its router has no bias that can make an expert unreachable"


def pad_result(result: LayerMergeResult, size: int, routing: RoutingSpec) -> tuple[LayerMergeResult, int]:
    """``result`` with ``size - G`` never-chosen zero experts appended; also returns their bytes."""
    reason = can_pad(routing)
    if reason is not None:
        raise ValueError(f"cannot pad this block: {reason}")
    w = result.weights
    n = size - w.num_experts
    if n <= 0:
        return result, 0

    def grow(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        return torch.cat([t, t.new_full((n, *t.shape[1:]), fill)])

    params = {k: grow(v) for k, v in w.params.items()}
    bias = w.router_bias
    if routing.selection_bias == "router_bias":
        if bias is None:
            raise ValueError("routing says router_bias but the block's router has no bias")
        bias = grow(bias, PAD_BIAS)
    extras = {k: grow(v, PAD_BIAS if k == routing.selection_bias else 0.0) for k, v in w.router_extras.items()}
    weights = w.replace(params=params, router_weight=grow(w.router_weight), router_bias=bias, router_extras=extras)
    cost = sum((v.numel() - w.params[k].numel()) * v.element_size() for k, v in params.items())
    dominant = torch.cat([result.dominant, result.dominant.new_full((n,), -1)])
    return LayerMergeResult(weights=weights, expert_map=result.expert_map, dominant=dominant), int(cost)
