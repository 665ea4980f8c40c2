"""An MoE layer whose router has more outputs than the bank has experts (the exact merged form).

After expert merging (M-SMoE, https://arxiv.org/abs/2310.01334, App. A3 "redirect") the router keeps
its E outputs and decisions; ``expert_map [E]`` sends router output e to expert ``expert_map[e]`` of a
bank of G <= E experts. A token whose chosen experts share a merged expert runs it once per slot, so
its gates add up: ``y = sum_k w_k f_{map[id_k]}(x)``, exactly the redirected original model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..experts.base import ExpertBank
from ..routers.base import Router
from ..types import MoEOutput, RoutingDecision
from .moe import check_layer_parts, run_layer

__all__ = ["RemappedMoE", "remap_decision"]


def remap_decision(decision: RoutingDecision, expert_map_E: Tensor, num_experts: int) -> RoutingDecision:
    """The decision as the bank sees it: ids mapped through ``expert_map_E``, weights unchanged.

    Per-expert fields over the router's outputs (logits, probabilities, load probabilities) do not
    describe the bank's experts and are dropped.
    """
    return replace(
        decision,
        ids_TK=expert_map_E[decision.ids_TK],
        num_experts=num_experts,
        logits_TE=None,
        probs_TE=None,
        load_prob_TE=None,
    )


class RemappedMoE(nn.Module):
    """``MoE`` with an index map between router outputs and experts.

    Args:
        router: router with E outputs (unchanged from the original model).
        experts: bank of G experts.
        expert_map: ``[E]`` int64 values in ``[0, G)`` (stored as a buffer, saved in checkpoints).
        combine: ``"sparse"`` or ``"dense"`` as in ``MoE``.

    ``forward`` returns ``MoEOutput`` whose ``decision`` is the router's own (E outputs), so routing
    statistics and aux losses still refer to the router.
    """

    def __init__(self, router: Router, experts: ExpertBank, expert_map: Tensor, *, combine: str = "sparse") -> None:
        super().__init__()
        self.combine = check_layer_parts(router, experts, combine)
        expert_map = torch.as_tensor(expert_map, dtype=torch.long, device="cpu")  # checked here, even under a meta device
        G, E = experts.num_experts, router.num_experts
        if expert_map.shape != (E,) or (expert_map < 0).any() or (expert_map >= G).any():
            raise ValueError(
                f"expert_map must be [router.num_experts={E}] with values in [0, {G}), got {expert_map.tolist()}"
            )
        self.router = router
        self.experts = experts
        self.register_buffer("expert_map", expert_map.to(next(experts.parameters()).device))

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: Tensor, *, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        G = self.experts.num_experts
        return run_layer(self.router, self.experts, self.combine, x, meta,
                         bank_view=lambda d: remap_decision(d, self.expert_map, G))  # fmt: skip

    def extra_repr(self) -> str:
        return f"router_outputs={self.router.num_experts}, experts={self.experts.num_experts}, combine={self.combine!r}"
