"""Training and evaluation of language models with the contract ``model(tokens) -> (logits, [MoEOutput])``.

One loop serves pre-training, recovery fine-tuning and compression fine-tuning: cross-entropy, plus
optional registered balancing losses, plus optional knowledge distillation from a teacher
``alpha * T^2 * KL(teacher_T || student_T)`` (Hinton et al. 2015; MC-SMoE uses alpha=0.2, T=2).
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import check_int, check_positive
from ..routers.base import Router
from ..training import aux_loss
from .lm import lm_loss

__all__ = ["train_lm", "evaluate_bpb", "distillation_loss", "lr_at"]


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
    """Train ``model`` for ``steps`` AdamW steps; returns the loss of every step.

    Args:
        batch_fn: ``batch_fn(step) -> [B, S+1]`` int64 windows (inputs ``[:, :-1]``, targets ``[:, 1:]``).
        aux_weights: registered balancing losses by name -> coefficient (``moekit.training.aux_loss``).
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
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            batch = batch_fn(step)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits, outputs = model(inputs)
            loss = lm_loss(logits, targets)
            if aux_weights:
                loss = loss + aux_loss(outputs, aux_weights)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits, _ = teacher(inputs)
                loss = loss + alpha * distillation_loss(logits, teacher_logits, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if after_step is not None:
                after_step(step)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    model.eval()
    return losses


@torch.no_grad()
def evaluate_bpb(model: nn.Module, windows_NS: Tensor, *, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy in bits per byte over ``windows_NS [N, S+1]`` (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows_NS.split(batch_size):
        logits, _ = model(chunk[:, :-1])
        total += float(lm_loss(logits, chunk[:, 1:])) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count / math.log(2)
