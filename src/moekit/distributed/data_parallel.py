"""Data parallelism around expert parallelism.

Gradient bookkeeping (global objective = mean over all W ranks of each rank's loss ``L_r``):

* dense parameters are replicated on every rank; DistributedDataParallel over the dense group
  averages their gradients: ``(1/W) sum_r dL_r/dtheta``;
* an expert shard receives, through the backward all-to-all, the gradient of the *sum* of the losses
  of its expert-parallel group; summing over the expert data-parallel group (when ``dp_size > 1``)
  gives ``sum_r dL_r/dtheta`` over all ranks, so ``sync_expert_grads`` divides by W. Without that
  division expert gradients would be ``ep_size`` times too large (the bug of pytorch#160285).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .comm import guarded
from .groups import ExpertParallelGroups
from .layer import ExpertParallelMoE

__all__ = ["expert_parameter_names", "wrap_ddp", "sync_expert_grads"]


def _expert_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.state_dict()``) of the sharded expert parameters and buffers."""
    names = []
    for name, layer in _expert_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        names += [prefix + n for n, _ in layer.experts.named_parameters()]
        names += [prefix + n for n, _ in layer.experts.named_buffers()]
    return names


def wrap_ddp(model: nn.Module, groups: ExpertParallelGroups, **ddp_kwargs) -> DistributedDataParallel:
    """DistributedDataParallel over the dense group for everything except the expert shards.

    Call ``sync_expert_grads(model, groups)`` after each backward (before the optimiser step).
    ``ddp_kwargs`` go to ``DistributedDataParallel`` (e.g. ``device_ids`` on GPU). The construction is
    collective (it checks and broadcasts the dense parameters): a dead peer raises ``ExpertParallelError``.
    """
    if not _expert_layers(model):
        raise ValueError(f"{type(model).__name__} has no ExpertParallelMoE layer; use expert_parallel(model, groups) first")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return guarded("DistributedDataParallel set-up (parameter check and broadcast)", groups.world_group,
                   lambda: DistributedDataParallel(model, process_group=groups.world_group, **ddp_kwargs),
                   groups.timeout_s)


@torch.no_grad()
def sync_expert_grads(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Make expert gradients those of the mean loss over all ranks (see the module docstring).

    Missing gradients (a shard that received no token) become zeros. One flat all-reduce over the
    expert data-parallel group when ``dp_size > 1``.
    """
    params = [p for _, layer in _expert_layers(model) for p in layer.experts.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    if groups.dp_size > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        guarded("all_reduce of expert gradients", groups.dp_group,
                lambda: dist.all_reduce(flat, group=groups.dp_group), groups.timeout_s)
        start = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[start : start + n].view_as(p))
            start += n
    for p in params:
        p.grad.div_(groups.world_size)
