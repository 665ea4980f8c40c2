"""A small, general training loop for MoE classifiers.

Model contract: ``model(x, meta=...) -> (logits [B, C], [MoEOutput, ...])``. The loss is
cross-entropy + the sum over blocks of ``coef * term`` for every aux term the layers return and every
registered balancing loss named in ``aux_weights`` (coefficients live here, in the config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .registry import LOSSES
from .types import MoEOutput

__all__ = ["TrainConfig", "aux_loss", "train_classifier", "evaluate_classifier"]

MetaFn = Callable[[Tensor], Mapping[str, Any] | None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``aux_weights`` maps a loss name (``moekit.list_losses()``) or an aux
    term a layer returns (e.g. ``"entropy_reg"``) to its coefficient."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    aux_weights: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0


def aux_loss(outputs: list[MoEOutput], weights: Mapping[str, float]) -> Tensor:
    """Weighted sum of registered losses and layer aux terms over all MoE blocks."""
    total = torch.zeros(())
    for out in outputs:
        for name, coef in weights.items():
            if name in out.aux:
                total = total + coef * out.aux[name]
            elif name in LOSSES:
                total = total + coef * LOSSES.get(name)(out.decision)
            else:
                raise ValueError(f"aux_weights names {name!r}, which is neither a registered loss "
                                 f"({', '.join(LOSSES.names())}) nor an aux term of the layer ({sorted(out.aux)})")
    return total


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    *,
    meta_fn: MetaFn | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Train with AdamW on ``(x [N, ...], y [N])``; returns the mean loss per epoch.

    ``meta_fn(indices)`` gives per-example metadata for a batch (indices into ``x``), e.g. hash keys.
    """
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = []
    model.train()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen)
        total, batches = 0.0, 0
        for idx in order.split(config.batch_size):
            logits, outputs = model(x[idx], meta=meta_fn(idx) if meta_fn else None)
            loss = F.cross_entropy(logits, y[idx]) + aux_loss(outputs, config.aux_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        history.append(total / batches)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
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
