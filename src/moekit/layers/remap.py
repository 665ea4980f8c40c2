"""An MoE layer whose router has more outputs than the bank has experts (the exact merged form).

After expert merging (M-SMoE, https://arxiv.org/abs/2310.01334, App. A3 "redirect") the router keeps
its E outputs and decisions; ``expert_map [E]`` sends router output e to expert ``expert_map[e]`` of a
bank of G <= E experts. A token whose chosen experts share a merged expert runs it once per slot, so
its gates add up: ``y = sum_k w_k f_{map[id_k]}(x)``, exactly the redirected original model.

Novices (MoNE, https://arxiv.org/abs/2507.00390): router outputs marked in ``novice_mask`` run no
expert; each returns its row of ``novices [E, D]`` (the pruned expert's mean output) times its gate.
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
        novices: ``[E, D]`` constant outputs of the router outputs in ``novice_mask`` (``[E]`` bool),
            or None (token-level banks only).

    ``forward`` returns ``MoEOutput`` whose ``decision`` is the router's own (E outputs), so routing
    statistics and aux losses still refer to the router.
    """

    def __init__(
        self, router: Router, experts: ExpertBank, expert_map: Tensor, *, combine: str = "sparse",
        novices: Tensor | None = None, novice_mask: Tensor | None = None,
    ) -> None:  # fmt: skip
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
        device = next(experts.parameters()).device
        self.register_buffer("expert_map", expert_map.to(device))
        if (novices is None) != (novice_mask is None):
            raise ValueError("give novices [E, D] and novice_mask [E] together, or neither")
        if novices is not None and novice_mask is not None:
            if novices.dim() != 2 or novices.shape[0] != E or tuple(novice_mask.shape) != (E,):
                raise ValueError(f"novices must be [E={E}, D] and novice_mask [E={E}], got "
                                 f"{tuple(novices.shape)} and {tuple(novice_mask.shape)}")  # fmt: skip
            if not experts.token_input:
                raise ValueError("novices need a token-level expert bank")
            if combine != "sparse":
                raise ValueError(f"novices need combine='sparse', got {combine!r}")
            self.register_buffer("novices", novices.detach().clone().to(device))
            self.register_buffer("novice_mask", novice_mask.detach().bool().clone().to(device))
        else:
            self.novices = None
            self.novice_mask = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: Tensor, *, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        G = self.experts.num_experts
        if self.novices is None:
            return run_layer(self.router, self.experts, self.combine, x, meta,
                             bank_view=lambda d: remap_decision(d, self.expert_map, G))  # fmt: skip
        seen: dict[str, RoutingDecision] = {}

        def view(d: RoutingDecision) -> RoutingDecision:
            seen["d"] = d
            bank = remap_decision(d, self.expert_map, G)
            return replace(bank, kept_TK=d.kept_mask() & ~self.novice_mask[d.ids_TK])

        out = run_layer(self.router, self.experts, self.combine, x, meta, bank_view=view)
        d = seen["d"]
        w = (d.weights_TK * (d.kept_mask() & self.novice_mask[d.ids_TK])).to(self.novices.dtype)
        add_TD = torch.einsum("tk,tkd->td", w, self.novices[d.ids_TK])
        return replace(out, y=out.y + add_TD.reshape(out.y.shape).to(out.y.dtype))

    def extra_repr(self) -> str:
        return f"router_outputs={self.router.num_experts}, experts={self.experts.num_experts}, combine={self.combine!r}"
