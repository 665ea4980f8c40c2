"""A small, general training loop for MoE classifiers.

Model contract: ``model(x, meta=...) -> (logits [B, C], [MoEOutput, ...])`` -- one ``MoEOutput`` per
MoE block (``moekit.models.MoEClassifier`` follows it). The loss is

    cross_entropy(logits, y) + sum over blocks and names of aux_weights[name] * term(name)

where ``term(name)`` is the block's own aux term of that name (``MoEOutput.aux``, e.g. COMET's
``entropy_reg``) or else the registered balancing loss of that name (``moekit.list_losses()``) applied
to the block's routing decision. Coefficients live in the caller's config, never in the layers.
Routers trained by REINFORCE (decisions carrying ``log_prob`` extras) get their policy and value
terms from the per-example cross-entropy automatically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_int, check_positive
from .registry import LOSSES
from .routers.base import name_routers
from .routers.estimators import reinforce_terms
from .types import MoEOutput

__all__ = ["TrainConfig", "aux_terms", "aux_loss", "train_classifier", "evaluate_classifier"]

MetaFn = Callable[[Tensor], Mapping[str, Any] | None]


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
    for epoch in bar:
        start, sums, batches = time.perf_counter(), {"loss": 0.0, "task_loss": 0.0}, 0
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
            logits, outputs = model(x[idx], meta=meta_fn(idx) if meta_fn else None)
            task_B = F.cross_entropy(logits, y[idx], reduction="none")
            terms = aux_terms(outputs, weights)
            loss = task_B.mean() + _reinforce_loss(outputs, task_B)
            for name, value in terms.items():
                loss = loss + weights[name] * value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batches += 1
            for key, value in [("loss", loss), ("task_loss", task_B.mean())] + [(f"aux.{n}", v) for n, v in terms.items()]:
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
