"""The *dispatcher* seam of ``MoE``: how the bank runs a routing decision (torchtitan's token dispatcher).

``dispatcher(experts, x_N, decision, sizes_G) -> y_N``: ``x_N`` are the rows the bank runs, ``decision``
has one row per routing group and ``sizes_G`` says how many consecutive rows each group spans
(``None``: one row each). Dispatchers hold no parameters (whatever state they need -- a process
group, a memory budget -- is plain configuration), so swapping one never changes a checkpoint.

* ``SparseDispatch`` (``"sparse"``): only the chosen experts run (sort by expert, grouped matmul,
  weighted scatter: ``moekit.experts.dispatch``).
* ``DenseMix`` (``"dense"``): every expert runs, outputs mixed by the decision's weights (oracle, output
  ensembles).
* ``MergeDispatch`` (``"merge"``, ``smear.py``): one expert merged per group from the router's
  probabilities (SMEAR).
* ``AllToAllDispatch`` (``"all_to_all"``, ``moekit.distributed.layer``): the experts are sharded over
  ranks, rows travel to their experts' owners and back.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .._checks import check_choice
from ..experts.base import ExpertBank
from ..experts.dispatch import combine_dense, dispatch
from ..registry import DISPATCHERS
from ..routers.base import Router
from ..types import RoutingDecision

__all__ = ["Dispatcher", "SparseDispatch", "DenseMix", "expand_decision", "stop_gradient_rows", "dispatcher_for"]


def expand_decision(decision: RoutingDecision, sizes_G: Tensor, total: int) -> RoutingDecision:
    """Repeat group g's decision for its ``sizes_G[g]`` positions: ``G`` rows -> ``total`` rows."""
    rep = lambda t: None if t is None else t.repeat_interleave(sizes_G, dim=0, output_size=total)  # noqa: E731
    return replace(decision, ids_TK=rep(decision.ids_TK), weights_TK=rep(decision.weights_TK),
                   kept_TK=rep(decision.kept_TK), logits_TE=rep(decision.logits_TE), probs_TE=rep(decision.probs_TE),
                   load_prob_TE=None, extras={})  # fmt: skip


def stop_gradient_rows(decision: RoutingDecision, rows_G: Tensor) -> RoutingDecision:
    """The decision with a stop-gradient on the weights of the rows where ``rows_G`` is true."""
    w = decision.weights_TK
    return replace(decision, weights_TK=torch.where(rows_G.unsqueeze(1), w.detach(), w))


class Dispatcher:
    """Base of the dispatchers. Subclasses implement ``run`` over one decision row per bank row, or
    override ``__call__`` to use the routing groups themselves (``MergeDispatch``)."""

    #: the name ``MoE(combine=...)`` knows it by; ``MoE.combine`` reports it
    name = "dispatcher"

    def check(self, router: Router, experts: ExpertBank) -> None:
        """Raise when this dispatcher cannot run ``router``'s decisions on ``experts`` (at build time):
        by default the bank must hold every expert the router names."""
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has num_experts={router.num_experts} but experts has num_experts={experts.num_experts}"
            )

    def __call__(self, experts: ExpertBank, x_N: Tensor, decision: RoutingDecision, sizes_G: Tensor | None) -> Tensor:
        if sizes_G is not None:
            decision = expand_decision(decision, sizes_G, x_N.shape[0])
        return self.run(experts, x_N, decision)

    def run(self, experts: ExpertBank, x_N: Tensor, decision: RoutingDecision) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@DISPATCHERS.register("sparse", paper="https://arxiv.org/abs/1701.06538")
class SparseDispatch(Dispatcher):
    """Only the chosen experts run: ``y_t = sum_k w_tk * expert_{id_tk}(x_t)`` over kept slots."""

    name = "sparse"

    def run(self, experts: ExpertBank, x_N: Tensor, decision: RoutingDecision) -> Tensor:
        return dispatch(experts, x_N, decision)


@DISPATCHERS.register("dense", paper="https://arxiv.org/abs/1701.06538")
class DenseMix(Dispatcher):
    """Every expert runs on every row, outputs mixed with the decision's dense gates ``[N, E]``."""

    name = "dense"

    def run(self, experts: ExpertBank, x_N: Tensor, decision: RoutingDecision) -> Tensor:
        return combine_dense(experts, x_N, decision.gates_TE())


def dispatcher_for(combine: "str | Dispatcher", allowed: tuple[str, ...] = ("sparse", "dense")) -> Dispatcher:
    """``combine`` as a dispatcher: a ``Dispatcher`` object, or the name of a registered one in ``allowed``
    (``moekit.registry.DISPATCHERS``; built without arguments)."""
    if isinstance(combine, Dispatcher):
        return combine
    return DISPATCHERS.create(check_choice("combine", combine, allowed))
