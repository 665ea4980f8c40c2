"""Expert-parallel MoE layer: the E experts are sharded over the ranks of the expert-parallel group.

Per forward, on every rank of the group (R ranks, ``E_l = E / R`` local experts each):

1. route the rank's own tokens with the (replicated) router and sort the kept slots by expert
   (``plan_dispatch``, the single-process dispatch plan: sorted by expert = grouped by owner rank);
2. exchange per-expert slot counts (``all_to_all_single`` of an ``[R, E_l + 1]`` table; the extra
   column says whether the sender needs gradients, so every rank joins the backward exchanges);
3. send the slots' token rows to the experts' owners (``all_to_all_single`` with uneven splits);
4. reorder the received rows by local expert and run ``ExpertBank.grouped_forward`` on the local shard;
5. send the results back (the reverse exchange) and combine them exactly like ``moekit.MoE``.

Steps 1-5 are the ``AllToAllDispatch`` dispatcher; ``ExpertParallelMoE`` is ``moekit.MoE`` with it (the
one forward: same input checks, features and ``MoEOutput``).

GShard-style semantics (Lepikhin et al. 2020, https://arxiv.org/abs/2006.16668): routing, capacity and
the decision in ``MoEOutput`` are per rank (local tokens); balancer statistics are summed over all
ranks (``count_reducer``), so aux-free bias updates are the same as for the global batch.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..experts.base import ExpertBank
from ..experts.dispatch import plan_dispatch, scatter_weighted
from ..layers.dispatchers import Dispatcher
from ..layers.moe import MoE
from ..registry import DISPATCHERS
from ..routers.base import Router
from ..types import MoEOutput, RoutingDecision
from .comm import all_reduce_sum, all_to_all, check_same_config, exchange_counts
from .groups import ExpertParallelGroups

__all__ = ["ExpertParallelMoE", "AllToAllDispatch", "shard_experts", "expert_parallel"]


def shard_experts(experts: ExpertBank, start: int, stop: int) -> ExpertBank:
    """A copy of ``experts`` holding only experts ``[start, stop)`` (parameters copied, not shared).

    Only the shard is copied: the full stacked tensors are mapped to their slices during the copy.
    """
    E = experts.num_experts
    if not 0 <= start < stop <= E:
        raise ValueError(f"expert shard [{start}, {stop}) must lie inside [0, num_experts={E})")
    memo: dict[int, Any] = {}
    for p in experts.stacked_parameters().values():
        memo[id(p)] = nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
    shard = copy.deepcopy(experts, memo)
    shard.num_experts = stop - start
    return shard


def _expert_major_order(recv_RE: Tensor) -> Tensor:
    """Permutation taking received rows (ordered by source rank, then local expert) to expert-major
    order (by local expert, then source rank -- the global-batch order of the single-process layer)."""
    R, E_l = recv_RE.shape
    expert_of_row = torch.arange(E_l, device=recv_RE.device).repeat(R).repeat_interleave(recv_RE.reshape(-1))
    return torch.argsort(expert_of_row, stable=True)


@DISPATCHERS.register("all_to_all", paper="https://arxiv.org/abs/2006.16668")
class AllToAllDispatch(Dispatcher):
    """The expert-parallel dispatcher: this rank's kept slots sorted by expert, sent to the experts'
    owners (``all_to_all``), run on the local shard, sent back and scattered like ``SparseDispatch``.

    Args:
        groups: the process-group layout (``make_groups``); the bank is this rank's ``E / ep_size`` experts.
    """

    name = "all_to_all"

    def __init__(self, groups: ExpertParallelGroups) -> None:
        self.groups = groups

    def local_experts(self, router: Router) -> int:
        """``E_l = E / ep_size``: the experts each rank holds."""
        E, R = router.num_experts, self.groups.ep_size
        if E % R:
            raise ValueError(
                f"num_experts={E} is not divisible by the expert-parallel size ep_size={R}; "
                f"choose an ep_size dividing {E} or a multiple of {R} experts"
            )
        return E // R

    def check(self, router: Router, experts: ExpertBank) -> None:
        if not router.is_sparse:
            raise ValueError(f"expert parallelism needs a sparse router (is_sparse=True), got {type(router).__name__}")
        E_l = self.local_experts(router)
        if experts.num_experts != E_l:
            raise ValueError(
                f"the local expert shard has num_experts={experts.num_experts}; with num_experts={router.num_experts} "
                f"over ep_size={self.groups.ep_size} ranks it must hold {E_l}"
            )

    def run(self, experts: ExpertBank, x_T: Tensor, decision: RoutingDecision) -> Tensor:
        plan = plan_dispatch(decision)
        y_N = self._run_remote_experts(experts, x_T[plan.token_N], plan.sizes_E)
        return scatter_weighted(y_N, plan, x_T.shape[0])

    def _run_remote_experts(self, experts: ExpertBank, x_N: Tensor, sizes_E: Tensor) -> Tensor:
        """Rows ``x_N`` sorted by global expert (``sizes_E`` per expert) -> their experts' outputs."""
        g = self.groups
        R, E_l = g.ep_size, experts.num_experts
        needs_grad = torch.is_grad_enabled() and (x_N.requires_grad or any(p.requires_grad for p in experts.parameters()))
        send_RC = torch.cat([sizes_E.reshape(R, E_l), torch.full((R, 1), int(needs_grad), device=sizes_E.device)], 1)
        recv_RC = exchange_counts(send_RC.to(g.device), g.ep_group, timeout_s=g.timeout_s).to(sizes_E.device)
        recv_RE = recv_RC[:, :E_l]
        keep_graph = bool(recv_RC[:, E_l].any())
        in_splits, out_splits = send_RC[:, :E_l].sum(1).tolist(), recv_RE.sum(1).tolist()
        x_recv = all_to_all(x_N, out_splits, in_splits, g.ep_group, keep_graph=keep_graph,
                            what="all_to_all of tokens to experts", timeout_s=g.timeout_s)
        order = _expert_major_order(recv_RE)
        y_sorted = experts.grouped_forward(x_recv[order], experts.stacked_parameters(), recv_RE.sum(0))
        y_recv = y_sorted[torch.argsort(order)]
        return all_to_all(y_recv, in_splits, out_splits, g.ep_group, keep_graph=keep_graph,
                          what="all_to_all of expert outputs", timeout_s=g.timeout_s)

    def __repr__(self) -> str:
        return f"AllToAllDispatch(ep_size={self.groups.ep_size})"


class ExpertParallelMoE(MoE):
    """MoE layer whose experts are sharded over ``groups.ep_group``: ``moekit.MoE`` with the
    ``AllToAllDispatch`` dispatcher; returns the same ``MoEOutput`` (``y`` for the local tokens, the
    local routing decision).

    Args:
        router: any sparse moekit router over all E experts (replicated on every rank).
        experts: this rank's shard, experts ``[ep_rank * E_l, (ep_rank + 1) * E_l)`` with
            ``E_l = E / ep_size`` (see ``shard_experts`` / ``from_moe``).
        groups: the process-group layout (``make_groups``).
        check_config: all-gather a hash of the layer config and raise on mismatch across ranks.

    A balancer on the router without a ``count_reducer`` gets one that sums over all ranks.
    """

    combines = ()

    def __init__(self, router: Router, experts: ExpertBank, groups: ExpertParallelGroups, *,
                 check_config: bool = True) -> None:
        if not isinstance(groups, ExpertParallelGroups):
            raise TypeError(f"groups must be ExpertParallelGroups (make_groups()), got {type(groups).__name__}")
        super().__init__(router, experts, combine=AllToAllDispatch(groups))
        self.groups = groups
        self.num_local_experts = experts.num_experts
        self.expert_offset = groups.ep_rank * self.num_local_experts
        balancer = router.balancer
        if balancer is not None and balancer.count_reducer is None:
            world, timeout = groups.world_group, groups.timeout_s
            balancer.count_reducer = lambda counts: all_reduce_sum(counts, world, timeout_s=timeout)
        if check_config:
            check_same_config(self.config_description(), groups.world_group, device=groups.device,
                              what="ExpertParallelMoE", timeout_s=groups.timeout_s)

    @property
    def num_experts(self) -> int:
        """All E experts (the router's outputs), not the local shard."""
        return self.router.num_experts

    @classmethod
    def from_moe(cls, moe: MoE, groups: ExpertParallelGroups, *, check_config: bool = True) -> "ExpertParallelMoE":
        """The expert-parallel twin of a single-process ``moekit.MoE`` (router copied, this rank's
        expert shard copied), so both compute the same function."""
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moekit.MoE, got {type(moe).__name__}")
        if moe.combine != "sparse":
            raise ValueError(f"expert parallelism needs combine='sparse', got combine={moe.combine!r}")
        E_l = AllToAllDispatch(groups).local_experts(moe.router)
        shard = shard_experts(moe.experts, groups.ep_rank * E_l, (groups.ep_rank + 1) * E_l)
        return cls(copy.deepcopy(moe.router), shard, groups, check_config=check_config)

    def config_description(self) -> str:
        """Everything that must agree across ranks: classes, reprs, parameter shapes and dtypes."""
        shapes = ",".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in self.named_parameters())
        return (f"router={type(self.router).__name__}({self.router.extra_repr()}) "
                f"balancer={type(self.router.balancer).__name__} "
                f"experts={type(self.experts).__name__}({self.experts.extra_repr()}) "
                f"num_experts={self.num_experts} ep_size={self.groups.ep_size} params=[{shapes}]")

    def forward(self, x: Tensor, *, mask: Tensor | None = None, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        if isinstance(x, Tensor) and x.device.type != self.groups.device.type:
            raise ValueError(
                f"input is on {x.device} but the {self.groups.backend} process group exchanges "
                f"{self.groups.device.type} tensors; use NCCL for CUDA tensors and gloo for CPU tensors"
            )
        return super().forward(x, mask=mask, meta=meta)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local=[{self.expert_offset}, "
                f"{self.expert_offset + self.num_local_experts}), ep_size={self.groups.ep_size}")


def expert_parallel(model: nn.Module, groups: ExpertParallelGroups, *, check_config: bool = True) -> nn.Module:
    """Replace every ``moekit.MoE`` inside ``model`` (in place) by its ``ExpertParallelMoE`` twin.

    Build ``model`` with the same seed on every rank first, so routers and dense parts agree.
    Returns ``model`` (a bare ``MoE`` is returned converted).
    """
    if type(model) is MoE:
        return ExpertParallelMoE.from_moe(model, groups, check_config=check_config)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is MoE]
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no moekit.MoE layer to shard")
    for name, moe in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, ExpertParallelMoE.from_moe(moe, groups, check_config=check_config))
    return model
