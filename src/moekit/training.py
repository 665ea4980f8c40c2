"""moekit's one training loop, and the objectives it is run with.

``training_steps(batches, step_loss, optimizer, *, before_step, after_backward, after_step)`` is the
loop: per batch, ``step_loss(batch) -> (loss, terms)``, zero grads, backward, the ``after_backward`` hook
(gradient clipping, expert-parallel gradient sync), the optimiser step, the ``after_step`` hook (a
pruner); it yields ``(step, loss, terms)`` for the caller to log. Its drivers:

* ``train_classifier`` -- MoE classifiers, epochs of shuffled batches (the demo, the experiments);
* ``train_lm`` -- language models: pre-training, recovery after merging (``moekit.merging.recover``) and
  compression fine-tuning, with optional distillation from a teacher;
* ``moekit.distributed.train.train_expert_parallel`` -- the expert-parallel trainer.

Classifier contract: ``model(x, meta=...) -> (logits [B, C], [MoEOutput, ...])`` -- one ``MoEOutput`` per
MoE block (``moekit.models.MoEClassifier`` follows it). The loss is

    cross_entropy(logits, y) + sum over blocks and names of aux_weights[name] * term(name)

where ``term(name)`` is the block's own aux term of that name (``MoEOutput.aux``, e.g. COMET's
``entropy_reg``) or else the registered balancing loss of that name (``moekit.list_losses()``) applied
to the block's routing decision. Coefficients live in the caller's config, never in the layers.
Routers trained by REINFORCE (decisions carrying ``log_prob`` extras) get their policy and value
terms from the per-example cross-entropy automatically.

Language-model contract: ``model(tokens [B, S]) -> (logits [B, S, V], [MoEOutput, ...])``; the loss is
next-token cross-entropy, plus optional balancing losses, plus optional knowledge distillation
``alpha * T^2 * KL(teacher_T || student_T)`` (Hinton et al. 2015; MC-SMoE uses alpha=0.2, T=2).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_int, check_positive
from .registry import LOSSES
from .routers.base import Router, name_routers
from .routers.estimators import reinforce_terms
from .types import MoEOutput

__all__ = [
    "TrainConfig", "training_steps", "aux_terms", "aux_loss", "train_classifier", "evaluate_classifier",
    "train_lm", "lm_loss", "distillation_loss", "lr_at",
]  # fmt: skip

MetaFn = Callable[[Tensor], Mapping[str, Any] | None]
Batch = TypeVar("Batch")


def training_steps(
    batches: Iterable[Batch],
    step_loss: Callable[[Batch], tuple[Tensor, Mapping[str, Tensor]]],
    optimizer: torch.optim.Optimizer,
    *,
    before_step: Callable[[int], None] | None = None,
    after_backward: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, Tensor, Mapping[str, Tensor]]]:
    """The one training loop (see the module docstring); yields ``(step, loss, terms)`` after each step.

    Args:
        batches: one batch per step.
        step_loss: ``step_loss(batch) -> (loss, terms)``: the scalar to minimise and named values to log.
        before_step: called with the step index first (a learning-rate schedule).
        after_backward: called between backward and the optimiser step (clipping, gradient sync).
        after_step: called after the optimiser step, gradients still present (a pruner).
    """
    for step, batch in enumerate(batches):
        if before_step is not None:
            before_step(step)
        loss, terms = step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        yield step, loss, terms


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of ``train_classifier`` as a serialisable config:
    ``train_classifier(model, data, **config.kwargs())``."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    aux_weights: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def aux_terms(outputs: list[MoEOutput], names: list[str] | tuple[str, ...] | Mapping[str, float]) -> dict[str, Tensor]:
    """Unweighted value of each named term, summed over MoE blocks (layer aux term, else registered loss)."""
    terms: dict[str, Tensor] = {}
    for out in outputs:
        for name in names:
            if name in out.aux:
                value = out.aux[name]
            elif name in LOSSES:
                value = LOSSES.get(name)(out.decision)
            else:
                raise ValueError(f"aux_weights names {name!r}, which is neither a registered loss "
                                 f"({', '.join(LOSSES.names())}) nor an aux term of the layer ({sorted(out.aux)})")
            terms[name] = terms[name] + value if name in terms else value
    return terms


def aux_loss(outputs: list[MoEOutput], weights: Mapping[str, float]) -> Tensor:
    """``sum_name weights[name] * term(name)`` over all MoE blocks (see the module docstring)."""
    total = torch.zeros(())
    for name, value in aux_terms(outputs, weights).items():
        total = total + weights[name] * value
    return total


def _reinforce_loss(outputs: list[MoEOutput], loss_B: Tensor) -> Tensor:
    total = torch.zeros(())
    for out in outputs:
        if "log_prob" in out.decision.extras:
            terms = reinforce_terms(out.decision, loss_B)
            total = total + terms["policy"] + terms["value"]
    return total


def train_classifier(
    model: nn.Module,
    train_data: tuple[Tensor, Tensor],
    *,
    epochs: int = 20,
    lr: float = 3e-3,
    aux_weights: Mapping[str, float] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    meta_fn: MetaFn | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` with AdamW on ``train_data = (x [N, ...], y [N])``, shuffled each epoch.

    Args:
        aux_weights: loss or aux-term name -> coefficient (see the module docstring).
        seed: seeds the shuffling and torch's global generator (router noise, dropout).
        meta_fn: ``meta_fn(indices)`` gives per-example metadata for a batch (indices into ``x``),
            e.g. ``{"token_ids": indices}`` for hash routing on example ids.
        progress: a tqdm bar over epochs (also off when stderr is not a terminal).
    Returns:
        one dict per epoch: ``epoch``, ``loss`` (total), ``task_loss`` (cross-entropy), ``aux.<name>``
        (mean unweighted value of each named term) and ``seconds``.
    """
    x, y = train_data
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"train_data needs as many labels as inputs (> 0), got {x.shape[0]} inputs, {y.shape[0]} labels")
    check_int("epochs", epochs, low=1)
    check_int("batch_size", batch_size, low=1)
    check_positive("lr", lr)
    weights = dict(aux_weights or {})
    name_routers(model)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(epochs), desc=desc, disable=None if progress else True, leave=False)
    def step_loss(idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, outputs = model(x[idx], meta=meta_fn(idx) if meta_fn else None)
        task_B = F.cross_entropy(logits, y[idx], reduction="none")
        terms = aux_terms(outputs, weights)
        loss = task_B.mean() + _reinforce_loss(outputs, task_B)
        for name, value in terms.items():
            loss = loss + weights[name] * value
        return loss, {"task_loss": task_B.mean(), **{f"aux.{n}": v for n, v in terms.items()}}

    for epoch in bar:
        start, sums, batches = time.perf_counter(), {"loss": 0.0, "task_loss": 0.0}, 0
        for _, loss, terms in training_steps(torch.randperm(x.shape[0], generator=gen).split(batch_size), step_loss, opt):
            batches += 1
            for key, value in [("loss", loss), *terms.items()]:
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        history.append({"epoch": epoch + 1, **{k: v / batches for k, v in sums.items()},
                        "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    return history


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, x: Tensor, y: Tensor, *, meta_fn: MetaFn | None = None, batch_size: int = 512
) -> tuple[float, list[list[MoEOutput]]]:
    """Accuracy on ``(x, y)`` in eval mode, and the MoE outputs of every batch (for statistics)."""
    model.eval()
    correct, outputs = 0, []
    for idx in torch.arange(x.shape[0]).split(batch_size):
        logits, outs = model(x[idx], meta=meta_fn(idx) if meta_fn else None)
        correct += int((logits.argmax(-1) == y[idx]).sum())
        outputs.append(outs)
    return correct / x.shape[0], outputs


def lm_loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats (divide by ln 2 for bits per byte)."""
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), targets_BS.reshape(-1))


def distillation_loss(student_BSV: Tensor, teacher_BSV: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over tokens."""
    V = student_BSV.shape[-1]
    s = F.log_softmax(student_BSV.reshape(-1, V).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_BSV.reshape(-1, V).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_lm(
    model: nn.Module,
    batch_fn: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float = 3e-3,
    warmup: int = 20,
    weight_decay: float = 0.0,
    aux_weights: Mapping[str, float] | None = None,
    teacher: nn.Module | None = None,
    alpha: float = 0.2,
    temperature: float = 2.0,
    freeze_routers: bool = False,
    after_step: Callable[[int], None] | None = None,
    quiet: bool = False,
    desc: str = "train",
) -> list[float]:
    """Train a language model for ``steps`` AdamW steps; returns the loss of every step.

    Args:
        batch_fn: ``batch_fn(step) -> [B, S+1]`` int64 windows (inputs ``[:, :-1]``, targets ``[:, 1:]``).
        aux_weights: registered balancing losses by name -> coefficient (``aux_loss``).
        teacher: adds ``alpha * distillation_loss`` against this (frozen, eval-mode) model.
        freeze_routers: routers are not updated (M-SMoE recovery); their parameters are restored
            to trainable afterwards.
        after_step: called after every optimiser step (gradients still present), e.g. a pruner.
    """
    check_int("steps", steps, low=0)
    check_positive("lr", lr)
    routers = [p for m in model.modules() if isinstance(m, Router) for p in m.parameters()]
    frozen = {id(p) for p in routers} if freeze_routers else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    flags = [(p, p.requires_grad) for p in routers]
    for p in routers:
        if id(p) in frozen:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if teacher is not None:
        teacher.eval()
    model.train()

    def schedule(step: int) -> None:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)

    def step_loss(batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, outputs = model(inputs)
        loss = lm_loss(logits, targets)
        if aux_weights:
            loss = loss + aux_loss(outputs, aux_weights)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = teacher(inputs)
            loss = loss + alpha * distillation_loss(logits, teacher_logits, temperature)
        return loss, {}

    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        batches = (batch_fn(step) for step in range(steps))
        for _, loss, _ in training_steps(batches, step_loss, opt, before_step=schedule,
                                         after_backward=lambda _: torch.nn.utils.clip_grad_norm_(params, 1.0),
                                         after_step=after_step):  # fmt: skip
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
    model.eval()
    return losses
