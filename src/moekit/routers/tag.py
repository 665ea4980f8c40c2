"""Tag (metadata) routing: a known label per example -- task, domain, language -- picks the expert."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import Meta, Router
from .hash import _meta_tensor

__all__ = ["TagRouter"]


@ROUTERS.register("tag", paper="https://arxiv.org/abs/2306.03745", summary="metadata value -> expert map")
class TagRouter(Router):
    """Routes every token of an example to ``mapping[meta[key]]`` with weight 1.

    Args:
        mapping: tag value -> expert id; default is the identity over ``0..E-1``.
        key: which ``meta`` entry holds the tags (``[T]`` integers).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        mapping: Mapping[int, int] | None = None,
        key: str = "tag",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, 1, check_finite=False)
        mapping = dict(mapping) if mapping is not None else {e: e for e in range(num_experts)}
        bad = {t: e for t, e in mapping.items() if not 0 <= e < num_experts}
        if bad:
            raise ValueError(f"mapping sends tags to experts outside [0, {num_experts}): {bad}")
        if any(t < 0 for t in mapping):
            raise ValueError(f"mapping keys (tags) must be >= 0, got {sorted(mapping)}")
        table = torch.full((max(mapping) + 1,), -1, dtype=torch.long)
        for tag, expert in mapping.items():
            table[tag] = expert
        self.key = key
        self.register_buffer("table", table.to(device))

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        tags = _meta_tensor(meta, self.key, x_TD.shape[0], type(self).__name__).to(self.table.device)
        in_range = (tags >= 0) & (tags < self.table.numel())
        ids = torch.where(in_range, self.table[tags.clamp(0, self.table.numel() - 1)], -1)
        if bool((ids < 0).any()):
            unknown = sorted(set(tags[ids < 0].tolist()))
            raise ValueError(f"meta[{self.key!r}] has tags {unknown[:10]} with no expert in the mapping")
        ids = ids.to(x_TD.device).unsqueeze(1)
        return RoutingDecision(ids_TK=ids, weights_TK=torch.ones(ids.shape, device=x_TD.device), num_experts=self.num_experts)
