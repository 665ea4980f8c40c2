"""Multi-gate multi-task MoE (MMoE, Ma et al. 2018, https://doi.org/10.1145/3219819.3220007): one
shared expert bank, one gate per task, one tower per task.

Each task's gate routes the raw input; sparse gates run only their chosen experts through the
grouped dispatch (``combine="sparse"``). ``forward`` returns the per-task outputs and the per-gate
``MoEOutput`` (aux terms, decisions); ``task_losses`` / ``task_metrics`` give each task's loss and
metric (cross-entropy / accuracy, or MSE / MSE).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..layers.moe import MoE
from ..registry import EXPERTS, MODELS, ROUTERS
from ..routers.base import Router
from ..types import MoEOutput

__all__ = ["TaskSpec", "MultiGateMoE", "MultiTaskOutput"]

TASK_KINDS = ("classification", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """A task: ``kind`` ``"classification"`` (``num_outputs`` classes) or ``"regression"`` (``num_outputs`` targets)."""

    name: str
    kind: str = "classification"
    num_outputs: int = 2

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, TASK_KINDS)
        check_int("num_outputs", self.num_outputs, low=2 if self.kind == "classification" else 1)

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "mse"


@dataclass(frozen=True)
class MultiTaskOutput:
    """``outputs[t]``: task t's logits ``[B, classes]`` or predictions ``[B, num_outputs]``;
    ``moe[t]``: what task t's gate decided (its aux terms and decision)."""

    outputs: list[Tensor]
    moe: list[MoEOutput]


def _as_task(task: TaskSpec | Mapping[str, Any]) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, Mapping):
        return TaskSpec(**task)
    raise TypeError(f"tasks must hold TaskSpec or dicts, got {type(task).__name__}")


@MODELS.register("mmoe", summary="multi-gate multi-task MoE: shared experts, one gate and tower per task")
class MultiGateMoE(MoE):
    """``y_t = tower_t(sum_e g_t(x)_e expert_e(x))`` for every task t.

    Args:
        in_dim: input features D (experts and gates both see the input).
        tasks: one ``TaskSpec`` (or dict) per task.
        num_experts, expert_dim, expert_hidden: bank size, expert output width, expert hidden width.
        experts, expert_kwargs: expert bank by registry name (default two-layer ReLU MLPs).
        router, router_kwargs: gate by registry name, built once per task.
        gates: ready-made gates instead (one per task; each must match ``in_dim`` and ``num_experts``).
        tower_hidden: hidden width of each task tower.
        combine: ``"sparse"`` (run only chosen experts) or ``"dense"`` (run all, mix; the oracle).
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec | Mapping[str, Any]],
        *,
        num_experts: int = 8,
        expert_dim: int = 32,
        expert_hidden: int = 64,
        experts: str = "mlp",
        expert_kwargs: Mapping[str, Any] | None = None,
        router: str = "softmax",
        router_kwargs: Mapping[str, Any] | None = None,
        gates: Sequence[Router] | None = None,
        tower_hidden: int = 32,
        combine: str = "sparse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        task_specs = [_as_task(t) for t in tasks]
        if not task_specs:
            raise ValueError("tasks must name at least one task, got none")
        check_int("in_dim", in_dim, low=1)
        check_choice("combine", combine, self.combines)
        kw = {"device": device, "dtype": dtype}
        bank = EXPERTS.create(
            experts,
            num_experts=num_experts,
            dim=in_dim,
            **{"hidden": expert_hidden, "out_dim": expert_dim, "activation": "relu", **(expert_kwargs or {})},
            **kw,
        )
        super().__init__(None, bank, combine=combine)  # routed per call: one gate per task
        self.tasks = task_specs
        self.in_dim = in_dim
        by_name = gates is None
        if gates is None:
            gates = [
                ROUTERS.create(router, dim=in_dim, num_experts=num_experts, **(router_kwargs or {}), **kw)
                for _ in self.tasks
            ]
        gates = list(gates)
        if len(gates) != len(self.tasks):
            raise ValueError(
                f"got {len(gates)} gates for {len(self.tasks)} tasks; a multi-gate model needs one gate per task"
            )
        for i, gate in enumerate(gates):
            if not isinstance(gate, Router):
                raise TypeError(f"gates[{i}] must be a moekit Router, got {type(gate).__name__}")
            if gate.dim != in_dim or gate.num_experts != num_experts:
                raise ValueError(
                    f"gates[{i}] has dim={gate.dim}, num_experts={gate.num_experts}; "
                    f"the model has in_dim={in_dim}, num_experts={num_experts}"
                )
        self.gates = nn.ModuleList(gates)
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(self.experts.out_dim, tower_hidden, **kw),
                nn.ReLU(),
                nn.Linear(tower_hidden, t.num_outputs, **kw),
            )
            for t in self.tasks
        )
        config = {
            "in_dim": in_dim,
            "tasks": [asdict(t) for t in self.tasks],
            "num_experts": num_experts,
            "expert_dim": expert_dim,
            "expert_hidden": expert_hidden,
            "experts": experts,
            "expert_kwargs": dict(expert_kwargs or {}),
            "router": router,
            "router_kwargs": dict(router_kwargs or {}),
            "tower_hidden": tower_hidden,
            "combine": combine,
        }
        self._config = config if by_name else None

    def config(self) -> dict[str, Any]:
        """Constructor keywords (for ``save_checkpoint``); not available for ready-made gates."""
        if self._config is None:
            raise ValueError(
                "this model was built from ready-made gates, which its config cannot rebuild; build the gates by "
                "name (router=..., router_kwargs=...) or pass config= and name= to save_checkpoint"
            )
        return dict(self._config)

    def forward(self, x: Tensor, meta: Mapping[str, Any] | None = None) -> MultiTaskOutput:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"input must be [B, in_dim={self.in_dim}], got shape {tuple(x.shape)}")
        moe = [self.forward_with(gate, x, meta=meta) for gate in self.gates]
        return MultiTaskOutput([tower(out.y) for tower, out in zip(self.towers, moe)], moe)

    def _check_targets(self, targets: Sequence[Tensor]) -> None:
        if len(targets) != len(self.tasks):
            raise ValueError(f"got {len(targets)} targets for {len(self.tasks)} tasks")

    def task_losses(self, out: MultiTaskOutput, targets: Sequence[Tensor]) -> list[Tensor]:
        """Cross-entropy (classification) or MSE (regression) per task."""
        self._check_targets(targets)
        losses = []
        for task, pred, y in zip(self.tasks, out.outputs, targets):
            if task.kind == "classification":
                losses.append(F.cross_entropy(pred.float(), y))
            else:
                losses.append(F.mse_loss(pred.float(), y.float().reshape(pred.shape)))
        return losses

    @torch.no_grad()
    def task_metrics(self, out: MultiTaskOutput, targets: Sequence[Tensor]) -> list[float]:
        """Accuracy (classification) or MSE (regression) per task."""
        self._check_targets(targets)
        metrics = []
        for task, pred, y in zip(self.tasks, out.outputs, targets):
            if task.kind == "classification":
                metrics.append(float((pred.argmax(-1) == y).float().mean()))
            else:
                metrics.append(float(F.mse_loss(pred.float(), y.float().reshape(pred.shape))))
        return metrics
