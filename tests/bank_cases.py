"""Expert banks (and a thread-count helper) shared by the inference tests."""

from __future__ import annotations

import torch

import moekit
from moekit.experts import LowRankSparseExperts, PackedLowRankSparseExperts


def compressed_bank(kind: str, packed: bool, E: int, dim: int, dtype: torch.dtype = torch.float32) -> moekit.ExpertBank:
    """A pruned low-rank + sparse bank (hidden 24, rank 3; ``kind`` "glu" or "mlp" with out_dim 8): about
    half the residual rows kept, expert 0 with none; ``packed`` in the packed form."""
    dense = moekit.GLUExperts(E, dim, 24) if kind == "glu" else moekit.MLPExperts(E, dim, 24, out_dim=8)
    bank = LowRankSparseExperts.from_bank(dense, 3)
    with torch.no_grad():
        for m in bank.matrices:
            mask = getattr(bank, f"{m}_mask")
            mask.copy_((torch.rand_like(mask) < 0.5).to(mask))
            mask[0] = 0
    bank = PackedLowRankSparseExperts.from_masked(bank) if packed else bank
    return bank.to(dtype)


def with_threads(n: int, fn):
    """``fn()`` with ``n`` intra-op threads, the caller's count restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)
