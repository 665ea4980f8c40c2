"""The "C" of MC-SMoE (https://arxiv.org/abs/2310.01334, Sec. 3.2): low-rank + structured-sparse experts.

Each expert weight ``W [O, I]`` becomes ``U V + S`` (LoSparse, https://arxiv.org/abs/2306.11222):
``U [O, r]``, ``V [r, I]`` from the truncated SVD (``sqrt(sigma)`` on both sides) and ``S = W - U V``
the residual. ``S`` is pruned *structurally* -- whole rows (output units) -- during a distillation
fine-tune: each row's importance is the mean of ``|s * dL/ds|`` over its entries, smoothed by an
exponential moving average (beta = 0.85, PLATON, https://arxiv.org/abs/2206.12562), and one global
threshold over all ``S`` matrices keeps the most important rows up to a kept fraction of ``S``'s
entries that follows a cubic schedule from 1 to ``final_ratio`` (paper: 0.10).

The bank itself is ``moekit.experts.lowrank.LowRankSparseExperts``; this module turns a model's banks
into it (``compress_experts``) and prunes it (``StructuredPruner``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._checks import check_int, check_positive
from ..experts.lowrank import LowRankSparseExperts
from .moekit_blocks import moe_layers

__all__ = ["LowRankSparseExperts", "compress_experts", "StructuredPruner", "cubic_ratio"]


def compress_experts(model: nn.Module, rank: int) -> nn.Module:
    """A copy of ``model`` with every MoE layer's mlp/glu bank replaced by ``LowRankSparseExperts``."""
    out = copy.deepcopy(model)
    layers = moe_layers(out)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer to compress")
    for layer in layers.values():
        layer.experts = LowRankSparseExperts.from_bank(layer.experts, rank)
    return out


def cubic_ratio(step: int, total: int, final_ratio: float, initial_warmup: int, final_warmup: int) -> float:
    """Kept fraction at ``step``: 1 until ``initial_warmup``, cubic decay to ``final_ratio`` reached at
    ``total - final_warmup`` and held after (PLATON / LoSparse schedule)."""
    end = total - final_warmup
    if step >= end:
        return final_ratio
    if step < initial_warmup:
        return 1.0
    progress = (step - initial_warmup) / (end - initial_warmup)
    return final_ratio + (1 - final_ratio) * (1 - progress) ** 3


class StructuredPruner:
    """Global structured pruning of the ``S`` rows of every ``LowRankSparseExperts`` in a model.

    Call ``step(t)`` after each optimiser step of the fine-tune (gradients present).
    """

    def __init__(
        self, model: nn.Module, *, steps: int, final_ratio: float = 0.1, initial_warmup: int = 0,
        final_warmup: int = 0, beta: float = 0.85,
    ) -> None:  # fmt: skip
        self.banks = [m for m in model.modules() if isinstance(m, LowRankSparseExperts)]
        if not self.banks:
            raise ValueError("the model has no LowRankSparseExperts to prune; call compress_experts first")
        check_positive("final_ratio", final_ratio)
        if final_ratio > 1:
            raise ValueError(f"final_ratio must be in (0, 1], got {final_ratio}")
        self.steps, self.final_ratio, self.beta = check_int("steps", steps, low=1), final_ratio, beta
        self.initial_warmup, self.final_warmup = initial_warmup, final_warmup
        self.scores = {(i, m): None for i, b in enumerate(self.banks) for m in b.matrices}

    def ratio(self, step: int) -> float:
        return cubic_ratio(step, self.steps, self.final_ratio, self.initial_warmup, self.final_warmup)

    @torch.no_grad()
    def step(self, step: int) -> None:
        for (i, m), old in self.scores.items():
            s = getattr(self.banks[i], f"{m}_s")
            if s.grad is None:
                continue
            row = (s * s.grad).abs().mean(-1) * getattr(self.banks[i], f"{m}_mask")
            self.scores[(i, m)] = row if old is None else self.beta * old + (1 - self.beta) * row
        ratio = self.ratio(step)
        if ratio < 1 and all(v is not None for v in self.scores.values()):
            self._apply(ratio)

    def _apply(self, ratio: float) -> None:
        keys = list(self.scores)
        scores = torch.cat([self.scores[k].reshape(-1).double().cpu() for k in keys])  # type: ignore[union-attr]
        sizes = torch.cat([
            torch.full((self.scores[k].numel(),), getattr(self.banks[k[0]], f"{k[1]}_s").shape[-1], dtype=torch.float64)  # type: ignore[union-attr]
            for k in keys
        ])  # fmt: skip
        order = torch.argsort(scores, descending=True, stable=True)
        keep_sorted = torch.cumsum(sizes[order], 0) <= ratio * sizes.sum()
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        start = 0
        for i, m in keys:
            mask = getattr(self.banks[i], f"{m}_mask")
            mask.copy_(keep[start : start + mask.numel()].reshape(mask.shape).to(mask))
            start += mask.numel()
