"""Compressed experts inside a Hugging Face MoE block (the low-rank + sparse step).

``CompressedExperts(bank)`` takes the place of a block's ``experts`` module with the same call,
``experts(hidden [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]``, and runs a moekit bank
(``PackedLowRankSparseExperts``: low-rank factors + kept rows of the sparse residual) through
``moekit.experts.dispatch``. Its tensors are saved under ``<block>.experts.lowrank.*``; stock
transformers cannot build this module, so such checkpoints are moekit-only (``moekit.load_hf_model``
rebuilds it from ``config.moekit_merge``).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from ...experts.dispatch import dispatch
from ...types import RoutingDecision

__all__ = ["CompressedExperts", "compressed_bank"]


class CompressedExperts(nn.Module):
    """A moekit bank behind the transformers experts call signature (see the module docstring)."""

    def __init__(self, bank: nn.Module) -> None:
        super().__init__()
        self.lowrank = bank
        self.num_experts = int(bank.num_experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        dtype = self.lowrank.down_proj_u.dtype
        decision = RoutingDecision(top_k_index.long(), top_k_weights.to(dtype), self.num_experts)
        return dispatch(self.lowrank, hidden_states.to(dtype), decision).to(hidden_states.dtype)


def compressed_bank(num_experts: int, layout: Mapping[str, Any]) -> nn.Module:
    """An empty ``PackedLowRankSparseExperts`` of the shapes recorded in ``config.moekit_merge``
    (``{"kind", "dim", "hidden", "activation", "bias", "rank", "kept_rows"}``), for loading."""
    from ...experts.packed import PackedLowRankSparseExperts

    kind = layout["kind"]
    return PackedLowRankSparseExperts(
        num_experts, int(layout["dim"]), int(layout["hidden"]), kind=kind, rank=int(layout["rank"]),
        kept_rows=layout["kept_rows"], activation=layout["activation"],
        bias=bool(layout["bias"]) if kind == "mlp" else None,
    )  # fmt: skip
