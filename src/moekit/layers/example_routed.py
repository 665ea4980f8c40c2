"""Per-example routing over an expert bank: the base of SMEAR and of the baselines it is compared with.

One routing decision per example (or per causal segment, ``segment_len``), computed from a pooled view
of it -- the masked mean over positions, or global average pooling for images -- then one combine:

* ``"sparse"``: the example's positions run only the chosen experts (tag, hash, top-1, ST-Gumbel,
  REINFORCE, DSelect-k): the decision is repeated for every position and dispatched as usual.
* ``"dense"``: output ensemble, every expert runs and outputs are mixed by the router (E x compute).

``SMEAR`` (``smear.py``) is this layer with a third combine, ``MergeDispatch``: one expert merged per
example. The per-example view (pooling, segments, metadata per group) is ``features.ExampleFeatures``;
the forward is ``MoE``'s.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts.base import ExpertBank
from ..routers.base import Router
from .dispatchers import Dispatcher, expand_decision, stop_gradient_rows
from .features import ExampleFeatures
from .moe import MoE

__all__ = ["ExampleRoutedMoE", "expand_decision", "stop_gradient_rows"]

COMBINES = ("sparse", "dense")


class ExampleRoutedMoE(MoE):
    """Route each example (or causal segment) once and combine experts by ``combine``: ``MoE`` with
    ``ExampleFeatures``.

    Args:
        router: any moekit router over ``experts.dim`` features (sees the pooled example).
        experts: an expert bank (adapter, mlp, glu; conv banks route whole images).
        combine: ``"sparse"`` or ``"dense"`` (see the module docstring), or a ``Dispatcher``.
        router_norm: a LayerNorm on the pooled features before the router (SMEAR's router has its own;
            the baselines use this so that every learned router sees the same normalised input).
        segment_len: route causal segments of this many positions instead of whole examples (Lory).
        first_segment: ``"self"`` or ``"default"``, see ``moekit.layers.segments``.

    Input: ``[B, S, D]`` sequences (with optional padding ``mask [B, S]``, true = real token),
    ``[B, D]`` vectors, or ``[B, C, H, W]`` images for conv banks. Returns ``MoEOutput`` with ``y``
    shaped like the input (last dim ``out_dim``) and a decision with one row per routing group
    (example, or (example, segment) in that order). ``meta`` holds per-example values (``[B]``).
    """

    combines: tuple[str, ...] = COMBINES

    def __init__(
        self,
        router: Router,
        experts: ExpertBank,
        *,
        combine: str | Dispatcher = "sparse",
        router_norm: bool = False,
        segment_len: int | None = None,
        first_segment: str = "self",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        norm = None
        if router_norm and isinstance(experts, ExpertBank):
            norm = nn.LayerNorm(experts.dim, device=device, dtype=dtype)
        super().__init__(router, experts, combine=combine, features=ExampleFeatures(segment_len, first_segment),
                         router_norm=norm)  # fmt: skip

    @property
    def segment_len(self) -> int | None:
        return self.features.segment_len

    @property
    def first_segment(self) -> str:
        return self.features.first_segment

    def extra_repr(self) -> str:
        if self.segment_len is None:
            return f"combine={self.combine!r}"
        return f"combine={self.combine!r}, segment_len={self.segment_len}, first_segment={self.first_segment!r}"
