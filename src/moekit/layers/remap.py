"""An MoE layer whose router has more outputs than the bank has experts (the exact merged form).

After expert merging (M-SMoE, https://arxiv.org/abs/2310.01334, App. A3 "redirect") the router keeps
its E outputs and decisions; ``expert_map [E]`` sends router output e to expert ``expert_map[e]`` of a
bank of G <= E experts. A token whose chosen experts share a merged expert runs it once per slot, so
its gates add up: ``y = sum_k w_k f_{map[id_k]}(x)``, exactly the redirected original model.
"""

from __future__ import annotations

from torch import Tensor

from ..experts.base import ExpertBank
from ..routers.base import Router
from .moe import MoE, remap_decision

__all__ = ["RemappedMoE", "remap_decision"]


class RemappedMoE(MoE):
    """``MoE`` with an index map between router outputs and experts (``MoE(expert_map=...)``).

    Args:
        router: router with E outputs (unchanged from the original model).
        experts: bank of G experts.
        expert_map: ``[E]`` int64 values in ``[0, G)`` (stored as a buffer, saved in checkpoints).
        combine: ``"sparse"`` or ``"dense"`` as in ``MoE``.

    ``forward`` returns ``MoEOutput`` whose ``decision`` is the router's own (E outputs), so routing
    statistics and aux losses still refer to the router.
    """

    def __init__(self, router: Router, experts: ExpertBank, expert_map: Tensor, *, combine: str = "sparse") -> None:
        super().__init__(router, experts, combine=combine, expert_map=expert_map)
