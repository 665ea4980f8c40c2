"""Hash routing (Roller et al. 2021): a fixed map from a key (token id, example id, ...) to experts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import Meta, Router

__all__ = ["HashRouter", "balanced_assignment"]


def balanced_assignment(key_counts: Sequence[int] | Tensor, num_experts: int) -> Tensor:
    """Greedy balanced hash: keys in decreasing frequency each go to the currently least-loaded
    expert (Roller et al.'s "balanced assignment"). Returns ``[num_keys]`` expert ids."""
    counts = torch.as_tensor(key_counts, dtype=torch.float64)
    load = [0.0] * num_experts
    table = torch.empty(counts.numel(), dtype=torch.long)
    for key in torch.argsort(counts, descending=True, stable=True).tolist():
        e = min(range(num_experts), key=load.__getitem__)
        table[key] = e
        load[e] += float(counts[key])
    return table


@ROUTERS.register("hash", paper="https://arxiv.org/abs/2106.04426", summary="fixed random or balanced hash of a key")
class HashRouter(Router):
    """Routes each token by ``table[meta[key]]``; weights are ``1/k``. No learned parameters.

    Args:
        num_keys: size of the key space (vocabulary size, number of examples, ...).
        key: which ``meta`` entry holds the integer keys, ``[T]`` (e.g. ``"token_ids"``).
        mode: ``"random"`` (a seeded random table; k distinct experts per key) or ``"balanced"``
            (greedy by ``key_counts``; k must be 1).
        key_counts: key frequencies for ``"balanced"``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_keys: int,
        k: int = 1,
        *,
        key: str = "token_ids",
        mode: str = "random",
        key_counts: Sequence[int] | Tensor | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, k, check_finite=False)
        self.num_keys = check_int("num_keys", num_keys, low=1)
        self.key = key
        self.mode = check_choice("mode", mode, ["random", "balanced"])
        if mode == "balanced":
            if key_counts is None or len(key_counts) != num_keys:
                raise ValueError(f"mode='balanced' needs key_counts of length num_keys={num_keys}")
            counts = torch.as_tensor(key_counts, dtype=torch.float64).reshape(-1)
            bad = counts[~(torch.isfinite(counts) & (counts >= 0))]
            if bad.numel():
                raise ValueError(f"key_counts must be finite counts >= 0 (one per key), got {bad[:5].tolist()}")
            if k != 1:
                raise ValueError(f"mode='balanced' supports k=1 only, got k={k}")
            table = balanced_assignment(key_counts, num_experts).unsqueeze(1)
        else:
            gen = torch.Generator().manual_seed(seed)
            table = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_keys)])
        self.register_buffer("table", table.to(device))

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        keys = _meta_tensor(meta, self.key, x_TD.shape[0], type(self).__name__).to(self.table.device)
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.num_keys):
            raise ValueError(
                f"meta[{self.key!r}] must lie in [0, num_keys={self.num_keys}), got range "
                f"[{int(keys.min())}, {int(keys.max())}]"
            )
        ids = self.table[keys]
        weights = torch.full(ids.shape, 1.0 / self.k, device=x_TD.device)
        return RoutingDecision(ids_TK=ids.to(x_TD.device), weights_TK=weights, num_experts=self.num_experts)


def _meta_tensor(meta: Meta | None, key: str, num_tokens: int, router: str) -> Tensor:
    """Fetch an integer ``[T]`` metadata tensor, with errors that say what is missing."""
    if meta is None or key not in meta:
        have = sorted(meta) if meta else []
        raise ValueError(f"{router} needs meta[{key!r}] (one integer per token); meta has keys {have}")
    value = torch.as_tensor(meta[key])
    if value.dim() != 1 or value.shape[0] != num_tokens or value.is_floating_point():
        raise ValueError(
            f"meta[{key!r}] must be an integer tensor of shape [{num_tokens}], got "
            f"{value.dtype} of shape {tuple(value.shape)}"
        )
    return value.long()
