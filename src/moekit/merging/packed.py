"""``pack_compressed``: swap every pruned ``LowRankSparseExperts`` of a model for its packed form
(``moekit.experts.packed.PackedLowRankSparseExperts``: only the kept rows of the residual stored)."""

from __future__ import annotations

import copy

from torch import nn

from ..experts.lowrank import LowRankSparseExperts
from ..experts.packed import PackedLowRankSparseExperts

__all__ = ["PackedLowRankSparseExperts", "pack_compressed"]


def pack_compressed(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every ``LowRankSparseExperts`` replaced by its ``PackedLowRankSparseExperts``.

    Call after pruning (``StructuredPruner``); the packed model computes the same function and
    ``save_checkpoint`` stores only the kept rows. Returns a copy unless ``inplace``.
    """
    out = model if inplace else copy.deepcopy(model)
    targets = [(name, mod) for name, mod in out.named_modules() if isinstance(mod, LowRankSparseExperts)]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no LowRankSparseExperts to pack; run compress_experts (and prune) first"
        )
    for name, bank in targets:
        packed = PackedLowRankSparseExperts.from_masked(bank).train(bank.training)
        parent, _, child = name.rpartition(".")
        if name:
            setattr(out.get_submodule(parent) if parent else out, child, packed)
        else:
            out = packed
    return out
