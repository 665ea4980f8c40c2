"""The synthetic multi-task regression data of Ma et al. 2018 (MMoE, https://doi.org/10.1145/3219819.3220007),
whose task correlation is a parameter.

Orthonormal ``u_1..u_T`` in R^d; ``w_1 = c u_1`` and ``w_t = c (p u_1 + sqrt(1 - p^2) u_t)`` for
``t >= 2`` (so ``cos(w_1, w_t) = p``; the paper's two-task case). ``x ~ N(0, I_d)`` and
``y_t = w_t . x + sum_i sin(alpha_i w_t . x + beta_i) + eps`` with ``alpha, beta ~ N(0, 1)``
shared by all tasks and ``eps ~ N(0, noise_std^2)`` (paper: variance 0.01). Targets are standardised
with training statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int, check_positive
from ..models.multitask import TaskSpec

__all__ = ["MultiTaskSplit", "make_synthetic_multitask", "split_sizes"]


@dataclass(frozen=True)
class MultiTaskSplit:
    """Features ``[N, D]`` and one target tensor per task for train / validation / test."""

    x_train: Tensor
    ys_train: list[Tensor]
    x_val: Tensor
    ys_val: list[Tensor]
    x_test: Tensor
    ys_test: list[Tensor]
    tasks: list[TaskSpec]

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes; each part gets at least one example."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise ValueError(f"{name} must be in (0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    n_val, n_test = max(1, round(total * val_fraction)), max(1, round(total * test_fraction))
    n_train = total - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{total} examples leave none for training with these fractions")
    return n_train, n_val, n_test


def make_synthetic_multitask(
    num_samples: int = 10_000,
    *,
    dim: int = 100,
    correlation: float = 0.5,
    num_tasks: int = 2,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> MultiTaskSplit:
    """Generate the data; ``correlation`` p in [-1, 1] is the cosine between ``w_1`` and every other ``w_t``."""
    check_int("num_samples", num_samples, low=3)
    check_int("num_tasks", num_tasks, low=1)
    check_int("dim", dim, low=num_tasks)
    check_int("num_sines", num_sines, low=0)
    check_positive("scale", scale)
    check_positive("noise_std", noise_std, allow_zero=True)
    if not isinstance(correlation, (int, float)) or not -1 <= correlation <= 1:
        raise ValueError(f"correlation must be a number in [-1, 1], got {correlation!r}")
    gen = torch.Generator().manual_seed(seed)
    u_DT, _ = torch.linalg.qr(torch.randn(dim, num_tasks, generator=gen, dtype=torch.float64))
    w_DT = scale * (correlation * u_DT[:, :1] + math.sqrt(1 - correlation**2) * u_DT)
    w_DT[:, 0] = scale * u_DT[:, 0]
    alpha, beta = torch.randn(2, num_sines, generator=gen, dtype=torch.float64)
    x = torch.randn(num_samples, dim, generator=gen, dtype=torch.float64)
    proj_NT = x @ w_DT
    y_NT = proj_NT + torch.sin(alpha * proj_NT.unsqueeze(-1) + beta).sum(-1)
    y_NT = y_NT + noise_std * torch.randn(y_NT.shape, generator=gen, dtype=torch.float64)
    n_train, n_val, _ = split_sizes(num_samples, val_fraction, test_fraction)
    mean, std = y_NT[:n_train].mean(0), y_NT[:n_train].std(0).clamp_min(1e-8)
    y_NT = ((y_NT - mean) / std).float()
    x = x.float()
    parts = [slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, num_samples)]
    xs = [x[p] for p in parts]
    ys = [[y_NT[p, t].contiguous() for t in range(num_tasks)] for p in parts]
    tasks = [TaskSpec(f"task{t + 1}", "regression", 1) for t in range(num_tasks)]
    return MultiTaskSplit(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], tasks)
