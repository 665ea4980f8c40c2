"""Recovery fine-tuning after merging (M-SMoE, https://arxiv.org/abs/2310.01334, Sec. 4.1).

Loss = task loss + ``alpha * T^2 * KL(teacher_T || student_T)`` with the full (unmerged) model as the
teacher (paper: alpha = 0.2, T = 2); routers are frozen and balancing losses are off.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..training import train_lm

__all__ = ["recover"]


def recover(
    student: nn.Module,
    teacher: nn.Module,
    batch_fn: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    alpha: float = 0.2,
    temperature: float = 2.0,
    warmup: int = 10,
    after_step: Callable[[int], None] | None = None,
    quiet: bool = False,
    desc: str = "recover",
) -> list[float]:
    """Fine-tune ``student`` in place with LM loss + distillation from ``teacher``, routers frozen.

    ``batch_fn(step) -> [B, S+1]`` byte windows; returns the per-step losses.
    """
    return train_lm(
        student, batch_fn, steps=steps, lr=lr, warmup=warmup, teacher=teacher, alpha=alpha,
        temperature=temperature, freeze_routers=True, after_step=after_step, quiet=quiet, desc=desc,
    )  # fmt: skip
