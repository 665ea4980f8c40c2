"""Evaluation of language models with the contract ``model(tokens) -> (logits, [MoEOutput])``; their
training is ``moekit.training.train_lm`` (the one loop), re-exported here with its loss helpers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..training import distillation_loss, lm_loss, lr_at, train_lm

__all__ = ["train_lm", "evaluate_bpb", "distillation_loss", "lr_at"]


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
