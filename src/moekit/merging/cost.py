"""Size and compute of (merged, compressed) models: stored parameters and forward FLOPs per token.

FLOPs count 2 per multiply-add of the matrix products (norms, activations and softmax are ignored),
as FLOP counters such as calflops do for the MC-SMoE tables (https://arxiv.org/abs/2310.01334).
"""

from __future__ import annotations

from torch import nn

from ..experts.mlp import GLUExperts, MLPExperts
from ..layers.moe import MoE
from ..layers.remap import RemappedMoE
from .compress import LowRankSparseExperts

__all__ = ["count_parameters", "expert_flops_per_token", "lm_flops_per_token"]


def count_parameters(model: nn.Module) -> int:
    """Parameters a checkpoint must store; pruned rows of compressed experts are not counted."""
    total = 0
    for module in model.modules():
        if isinstance(module, LowRankSparseExperts):
            total += module.parameter_count()
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def expert_flops_per_token(bank: nn.Module) -> float:
    """Mean forward FLOPs of one expert of ``bank`` on one token."""
    if callable(getattr(bank, "flops_per_token_E", None)):  # compressed banks, masked or packed
        return float(bank.flops_per_token_E().mean())
    if isinstance(bank, GLUExperts):
        return 2.0 * 3 * bank.dim * bank.hidden
    if isinstance(bank, MLPExperts):
        return 2.0 * bank.hidden * (bank.dim + bank.out_dim)
    raise TypeError(f"no FLOP model for expert bank {type(bank).__name__}")


def lm_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of a ``MoELM`` at context ``seq_len`` (causal: mean context (S+1)/2).

    Per layer: q/k/v/output projections, attention scores and values, router, and k expert runs
    (each of the token's k router choices runs one expert, merged or not); plus the output head.
    """
    total = 0.0
    dim = model.head.in_features
    for block in model.blocks:
        moe = block.moe
        if not isinstance(moe, (MoE, RemappedMoE)):
            raise TypeError(f"no FLOP model for layer {type(moe).__name__}")
        total += 2.0 * 4 * dim * dim + 2.0 * 2 * dim * (seq_len + 1) / 2
        total += 2.0 * dim * moe.router.num_experts
        total += moe.router.k * expert_flops_per_token(moe.experts)
    total += 2.0 * dim * model.head.out_features
    return total

