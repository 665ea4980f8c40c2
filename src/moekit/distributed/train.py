"""Expert-parallel training of a small MoE classifier on scikit-learn's digits, under torchrun (the one
loop of ``moekit.training``, with the expert-gradient sync as its ``after_backward`` hook).

    torchrun --nproc_per_node 2 -m moekit.distributed.train --steps 20
    python -m moekit.distributed.train --steps 20        # the same run in one process, no torch.distributed

Every step draws the same *global* batch on every rank (a seeded permutation per epoch); rank r
trains on slice r of it. Experts are sharded over the expert-parallel group, the other parameters
are replicated and averaged by DistributedDataParallel, expert gradients are fixed up by
``sync_expert_grads``; so the losses equal those of the single-process run on the global batch
(dropless routing; with a capacity factor, capacity applies per rank's slice). Progress goes to
stdout from rank 0 only. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import check_choice, check_int, check_positive
from ..data.digits import DigitsSplit, load_digits_split
from ..training import aux_loss, training_steps
from .comm import all_reduce_sum
from .data_parallel import sync_expert_grads, wrap_ddp
from .groups import ExpertParallelGroups
from .layer import expert_parallel
from .model import ep_moe_classifier

__all__ = ["EPTrainConfig", "EPTrainResult", "train_expert_parallel", "global_batches", "ROUTER_CHOICES", "OPTIMIZERS"]

ROUTER_CHOICES = ("topk", "switch")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class EPTrainConfig:
    """Model and optimisation settings (identical on every rank). ``batch_size`` is the global batch."""

    steps: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    optimizer: str = "adamw"
    dim: int = 64
    depth: int = 2
    num_experts: int = 8
    k: int = 2
    router: str = "topk"
    noisy: bool = False
    capacity_factor: float | None = None
    aux_free_rate: float | None = None
    z_loss: float = 0.0
    log_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_positive("lr", self.lr)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("router", self.router, ROUTER_CHOICES)
        check_int("log_every", self.log_every, low=1)
        check_positive("z_loss", self.z_loss, allow_zero=True)

    def model_config(self, in_dim: int, num_classes: int) -> dict[str, Any]:
        """Keyword arguments of the ``ep_moe_classifier`` builder (JSON-serialisable)."""
        if self.router == "topk":
            router_kwargs = {"k": self.k, "noisy": self.noisy, "capacity_factor": self.capacity_factor}
        else:
            router_kwargs = {"capacity_factor": self.capacity_factor}
        return {"in_dim": in_dim, "num_classes": num_classes, "dim": self.dim, "depth": self.depth,
                "num_experts": self.num_experts, "router": self.router, "router_kwargs": router_kwargs,
                "aux_free_rate": self.aux_free_rate}


@dataclass
class EPTrainResult:
    """Per-step losses (mean over ranks = loss of the global batch), test accuracy, timing, the model."""

    losses: list[float]
    accuracy: float
    seconds: float
    examples_per_s: float
    model: nn.Module


def global_batches(num_examples: int, batch_size: int, steps: int, seed: int) -> Iterator[Tensor]:
    """``steps`` index batches of exactly ``batch_size``: a seeded permutation per epoch, last partial batch dropped."""
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples")
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while True:
        order = torch.randperm(num_examples, generator=gen)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


def _sum_over_ranks(value: Tensor, groups: ExpertParallelGroups | None) -> float:
    if groups is None:
        return float(value.detach())
    return float(all_reduce_sum(value.detach().reshape(1), groups.world_group, timeout_s=groups.timeout_s))


@torch.no_grad()
def _accuracy(model: nn.Module, data: DigitsSplit, groups: ExpertParallelGroups | None, device: torch.device) -> float:
    model.eval()
    rank, world = (0, 1) if groups is None else (groups.rank, groups.world_size)
    idx = torch.tensor_split(torch.arange(data.x_test.shape[0]), world)[rank]
    logits, _ = model(data.x_test[idx].to(device))
    correct = (logits.argmax(-1).cpu() == data.y_test[idx]).sum().float().to(device)
    model.train()
    return _sum_over_ranks(correct, groups) / data.x_test.shape[0]


def train_expert_parallel(
    config: EPTrainConfig,
    groups: ExpertParallelGroups | None = None,
    *,
    data: DigitsSplit | None = None,
    quiet: bool = False,
) -> EPTrainResult:
    """Train with experts sharded over ``groups`` (``None``: one process, plain ``moekit.MoE`` layers)."""
    data = load_digits_split(seed=config.seed) if data is None else data
    rank, world = (0, 1) if groups is None else (groups.rank, groups.world_size)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the world size {world}")
    device = torch.device("cpu") if groups is None else groups.device
    torch.manual_seed(config.seed)  # identical initialisation on every rank
    model = ep_moe_classifier(**config.model_config(data.num_features, int(data.y_train.max()) + 1)).to(device)
    net: nn.Module = model
    if groups is not None:
        model = expert_parallel(model, groups)
        net = wrap_ddp(model, groups, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(config.seed + 1 + rank)  # router noise differs per rank
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=config.lr) if config.optimizer == "adamw"
           else torch.optim.SGD(params, lr=config.lr, momentum=0.9))
    aux_weights = {"z": config.z_loss} if config.z_loss > 0 else {}
    log = (lambda msg: tqdm.write(msg)) if rank == 0 and not quiet else (lambda msg: None)
    bar = tqdm(total=config.steps, desc="train", disable=rank != 0 or quiet or None, leave=False)
    losses: list[float] = []
    start = time.perf_counter()
    def step_loss(batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        idx = batch.tensor_split(world)[rank]
        logits, outputs = net(data.x_train[idx].to(device))
        return F.cross_entropy(logits, data.y_train[idx].to(device)) + aux_loss(outputs, aux_weights).to(device), {}

    sync = None if groups is None else (lambda _: sync_expert_grads(model, groups))
    batches = global_batches(data.x_train.shape[0], config.batch_size, config.steps, config.seed)
    for step, loss, _ in training_steps(batches, step_loss, opt, after_backward=sync):
        losses.append(_sum_over_ranks(loss, groups) / world)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            rate = (step + 1) * config.batch_size / (time.perf_counter() - start)
            log(f"step {step + 1}/{config.steps}  loss {losses[-1]:.4f}  {rate:,.0f} examples/s")
    seconds = time.perf_counter() - start
    bar.close()
    accuracy = _accuracy(model, data, groups, device)
    log(f"test accuracy {accuracy:.4f}  ({seconds:.1f}s, world={world}"
        + ("" if groups is None else f", ep={groups.ep_size}, dp={groups.dp_size}") + ")")
    return EPTrainResult(losses, accuracy, seconds, config.steps * config.batch_size / seconds, model)


if __name__ == "__main__":  # the command line lives in cli/ (argument parsing only there)
    from moekit.cli.distributed_train import main

    sys.exit(main())
