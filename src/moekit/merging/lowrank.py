"""The low-rank + structured-sparse step of the pipeline, one MoE block at a time (MC-SMoE's "C").

``compress_block(weights, options, recovery=None)`` turns a block's (merged or kept) experts into a
``PackedLowRankSparseExperts`` bank (https://arxiv.org/abs/2310.01334, Sec. 3.2; the math is
``moekit.merging.compress`` / ``packed``):

1. each expert matrix ``W`` becomes ``U V + S`` (rank-``r`` SVD factors + residual);
2. rows of ``S`` are pruned to the kept fraction ``keep_residual`` of its entries, with one threshold
   over the block's matrices (a streamed run sees one block at a time, so the threshold is per block,
   not over the whole model as in the paper):

   * without recovery, by row magnitude (mean ``|s|``);
   * with ``recover_steps > 0``, during **layer-wise recovery**: the compressed block is trained to
     match the original block's outputs ``Y`` on its calibration inputs ``X`` (mean squared error,
     Adam, router and shared experts frozen) while the kept fraction follows the cubic schedule from
     1 to ``keep_residual``, rows scored by PLATON's ``|s * dL/ds|`` (``StructuredPruner``) --
     the streaming-friendly form of the paper's distillation recovery;
3. the pruned rows are dropped (``PackedLowRankSparseExperts.from_masked``), so the block is stored at
   its real size.

The step is deterministic for a given input (fixed seed for the minibatch order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..experts.lowrank import LowRankSparseExperts
from ..experts.mlp import GLUExperts, MLPExperts
from ..experts.packed import PackedLowRankSparseExperts
from ..training import training_steps
from .compress import StructuredPruner
from .weights import BankWeights

__all__ = ["LowRankOptions", "Recovery", "dense_bank", "compress_block", "prune_by_magnitude"]


@dataclass(frozen=True)
class LowRankOptions:
    """Settings of the low-rank + sparse step.

    Attributes:
        rank: r of ``U [O, r] V [r, I]`` (each matrix uses ``min(r, O, I)``).
        keep_residual: fraction of ``S``'s entries kept, as whole rows (paper: 0.10); 0 keeps none.
        recover_steps: layer-wise recovery steps (0: magnitude pruning, no training).
        recover_lr: Adam learning rate of the recovery.
        recover_tokens: calibration tokens per recovery step (a fixed-seed minibatch).
        recover_pool: calibration tokens per block kept for recovery (the first ones).
    """

    rank: int
    keep_residual: float = 0.1
    recover_steps: int = 0
    recover_lr: float = 1e-4
    recover_tokens: int = 512
    recover_pool: int = 4096

    def __post_init__(self) -> None:
        check_int("rank", self.rank, low=1)
        check_int("recover_steps", self.recover_steps, low=0)
        check_int("recover_tokens", self.recover_tokens, low=1)
        check_int("recover_pool", self.recover_pool, low=1)
        if not 0.0 <= self.keep_residual <= 1.0:
            raise ValueError(f"keep_residual must be in [0, 1], got {self.keep_residual}")
        if not self.recover_lr > 0:
            raise ValueError(f"recover_lr must be > 0, got {self.recover_lr}")


@dataclass(frozen=True)
class Recovery:
    """What layer-wise recovery matches: the block's calibration inputs ``inputs_TD``, the original
    block's outputs on them ``targets_TD``, and ``forward(bank, x_ND) -> [N, D]``: the block with
    ``bank`` as its experts (differentiable in the bank's parameters)."""

    inputs_TD: Tensor
    targets_TD: Tensor
    forward: Callable[[nn.Module, Tensor], Tensor]


def dense_bank(weights: BankWeights) -> GLUExperts | MLPExperts:
    """A moekit bank holding ``weights``' experts (fp32 copies). Activations without a moekit bank
    (GPT-OSS's clamped SwiGLU) are refused."""
    p = weights.params
    E, D, F = p["down_proj"].shape[0], p["down_proj"].shape[1], p["down_proj"].shape[2]
    if weights.kind == "glu":
        if set(p) != {"gate_up_proj", "down_proj"}:
            raise ValueError(f"low-rank compression of gated experts with biases is not supported (tensors {sorted(p)})")
        try:
            bank: GLUExperts | MLPExperts = GLUExperts(E, p["gate_up_proj"].shape[2], F, activation=weights.activation)
        except ValueError:
            raise ValueError(f"low-rank compression does not support the expert activation {weights.activation!r}") from None
    else:
        bank = MLPExperts(E, p["up_proj"].shape[2], F, out_dim=D, activation=weights.activation, bias="up_bias" in p)
    with torch.no_grad():
        for name, t in p.items():
            getattr(bank, name).copy_(t.float())
    return bank


def prune_by_magnitude(bank: LowRankSparseExperts, keep: float) -> None:
    """Keep the rows of ``S`` with the largest mean ``|s|`` up to ``keep`` of its entries (one threshold
    over the bank's matrices)."""
    pruner = StructuredPruner(bank, steps=1, final_ratio=max(keep, 1e-12))
    for key in pruner.scores:
        pruner.scores[key] = getattr(bank, f"{key[1]}_s").detach().abs().mean(-1)
    pruner._apply(keep)


def compress_block(
    weights: BankWeights,
    options: LowRankOptions,
    recovery: Recovery | None = None,
) -> PackedLowRankSparseExperts:
    """The packed low-rank + sparse bank of a block's experts (see the module docstring).

    Args:
        weights: the block's experts (merged or kept), moekit layout.
        options: rank, kept residual fraction, recovery settings.
        recovery: what layer-wise recovery matches (``Recovery``); None (or ``recover_steps == 0``)
            prunes by magnitude.
    """
    low = LowRankSparseExperts.from_bank(dense_bank(weights), options.rank)
    if recovery is None or options.recover_steps == 0:
        prune_by_magnitude(low, options.keep_residual)
    else:
        _recover(low, options, recovery)
    return PackedLowRankSparseExperts.from_masked(low).to(weights.params["down_proj"].dtype)


def _recover(low: LowRankSparseExperts, options: LowRankOptions, recovery: Recovery) -> None:
    steps = options.recover_steps
    pruner = StructuredPruner(low, steps=steps, final_ratio=max(options.keep_residual, 1e-12))
    optimizer = torch.optim.Adam(low.parameters(), lr=options.recover_lr)
    T = recovery.inputs_TD.shape[0]
    generator = torch.Generator().manual_seed(0)
    batches = (torch.randperm(T, generator=generator)[: options.recover_tokens] for _ in range(steps))

    def step_loss(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = recovery.forward(low, recovery.inputs_TD[rows])
        return (out.float() - recovery.targets_TD[rows].float()).pow(2).mean(), {}

    with torch.enable_grad():
        for _ in training_steps(batches, step_loss, optimizer, after_step=pruner.step):
            pass
    if options.keep_residual == 0.0 or pruner.ratio(steps) > options.keep_residual:
        prune_by_magnitude(low, options.keep_residual)
