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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_mapping(mapping: Mapping[int, int], num_experts: int) -> tuple[Tensor, Tensor]:
    """The tags (sorted, int64) and their experts of a tag -> expert mapping, checked."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"mapping must be a non-empty dict of tag -> expert, got {mapping!r}")
    bad_tags = [t for t in mapping if not _is_int(t)]
    if bad_tags:
        raise TypeError(f"mapping keys (tags) must be integers, got {bad_tags[:5]}")
    bad_types = {t: e for t, e in mapping.items() if not _is_int(e)}
    if bad_types:
        raise TypeError(f"mapping values (experts) must be integers, got {dict(list(bad_types.items())[:5])}")
    bad = {t: e for t, e in mapping.items() if not 0 <= e < num_experts}
    if bad:
        raise ValueError(f"mapping sends tags to experts outside [0, {num_experts}): {bad}")
    tags = sorted(mapping)
    if not (-(2**63) <= tags[0] and tags[-1] < 2**63):
        raise ValueError(f"mapping keys (tags) must fit in int64, got range [{tags[0]}, {tags[-1]}]")
    return torch.tensor(tags, dtype=torch.long), torch.tensor([mapping[t] for t in tags], dtype=torch.long)


@ROUTERS.register("tag", paper="https://arxiv.org/abs/2306.03745", summary="metadata value -> expert map")
class TagRouter(Router):
    """Routes every token of an example to ``mapping[meta[key]]`` with weight 1.

    Args:
        mapping: tag value (any integer) -> expert id in ``[0, E)``; default is the identity over
            ``0..E-1``. Looked up by binary search in the sorted tags, so its size, not its largest tag,
            sets the memory.
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
        identity = {e: e for e in range(num_experts)}
        tags, experts = _check_mapping(identity if mapping is None else mapping, num_experts)
        self.key = key
        self.register_buffer("tag_values", tags.to(device))  # sorted
        self.register_buffer("tag_experts", experts.to(device))

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        tags = _meta_tensor(meta, self.key, x_TD.shape[0], type(self).__name__).to(self.tag_values.device)
        where = torch.searchsorted(self.tag_values, tags).clamp_max(self.tag_values.numel() - 1)
        ids = torch.where(self.tag_values[where] == tags, self.tag_experts[where], -1)
        if bool((ids < 0).any()):
            unknown = sorted(set(tags[ids < 0].tolist()))
            raise ValueError(f"meta[{self.key!r}] has tags {unknown[:10]} with no expert in the mapping")
        ids = ids.to(x_TD.device).unsqueeze(1)
        return RoutingDecision(ids_TK=ids, weights_TK=torch.ones(ids.shape, device=x_TD.device), num_experts=self.num_experts)
