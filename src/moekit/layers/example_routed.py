"""Per-example routing over an expert bank: the base of SMEAR and of the baselines it is compared with.

One routing decision per example (or per causal segment, ``segment_len``), computed from a pooled view
of it -- the masked mean over positions, or global average pooling for images -- then one combine:

* ``"sparse"``: the example's positions run only the chosen experts (tag, hash, top-1, ST-Gumbel,
  REINFORCE, DSelect-k): the decision is repeated for every position and dispatched as usual.
* ``"dense"``: output ensemble, every expert runs and outputs are mixed by the router (E x compute).

``SMEAR`` (``smear.py``) is this layer with a third combine: one expert merged per example.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..experts.base import ExpertBank
from ..experts.dispatch import combine_dense, dispatch
from ..routers.base import Router
from ..types import MoEOutput, RoutingDecision
from .checks import check_layer_input
from .pooling import RoutingGroups, example_groups
from .segments import FIRST_SEGMENT, causal_segment_groups

__all__ = ["ExampleRoutedMoE", "expand_decision", "stop_gradient_rows"]

COMBINES = ("sparse", "dense")


def expand_decision(decision: RoutingDecision, sizes_G: Tensor, total: int) -> RoutingDecision:
    """Repeat group g's decision for its ``sizes_G[g]`` positions: ``G`` rows -> ``total`` rows."""
    rep = lambda t: None if t is None else t.repeat_interleave(sizes_G, dim=0, output_size=total)  # noqa: E731
    return replace(decision, ids_TK=rep(decision.ids_TK), weights_TK=rep(decision.weights_TK),
                   kept_TK=rep(decision.kept_TK), logits_TE=rep(decision.logits_TE), probs_TE=rep(decision.probs_TE),
                   load_prob_TE=None, extras={})  # fmt: skip


def stop_gradient_rows(decision: RoutingDecision, rows_G: Tensor) -> RoutingDecision:
    """The decision with a stop-gradient on the weights of the rows where ``rows_G`` is true."""
    w = decision.weights_TK
    return replace(decision, weights_TK=torch.where(rows_G.unsqueeze(1), w.detach(), w))


class ExampleRoutedMoE(nn.Module):
    """Route each example (or causal segment) once and combine experts by ``combine``.

    Args:
        router: any moekit router over ``experts.dim`` features (sees the pooled example).
        experts: an expert bank (adapter, mlp, glu; conv banks route whole images).
        combine: ``"sparse"`` or ``"dense"`` (see the module docstring).
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
        combine: str = "sparse",
        router_norm: bool = False,
        segment_len: int | None = None,
        first_segment: str = "self",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(router, Router):
            raise TypeError(f"router must be a moekit Router, got {type(router).__name__}")
        if not isinstance(experts, ExpertBank):
            raise TypeError(f"experts must be a moekit ExpertBank, got {type(experts).__name__}")
        if router.num_experts != experts.num_experts:
            raise ValueError(f"router has num_experts={router.num_experts} but experts has {experts.num_experts}")
        if router.dim != experts.dim:
            raise ValueError(f"router has dim={router.dim} but experts has dim={experts.dim}")
        if segment_len is not None:
            check_int("segment_len", segment_len, low=1)
            if not experts.token_input:
                raise ValueError(
                    f"segment_len needs a token expert bank (adapter, mlp, glu), got {type(experts).__name__}"
                )
        self.router = router
        self.experts = experts
        self.combine = check_choice("combine", combine, self.combines)
        self.router_norm = nn.LayerNorm(experts.dim, device=device, dtype=dtype) if router_norm else None
        self.segment_len = segment_len
        self.first_segment = check_choice("first_segment", first_segment, FIRST_SEGMENT)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: Tensor, *, mask: Tensor | None = None, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        x_BS, restore = self._as_sequences(x)
        groups = self.groups(x_BS, mask)
        route_in = groups.route_in_GD if self.router_norm is None else self.router_norm(groups.route_in_GD)
        decision = self.router(route_in, meta=_group_meta(meta, x_BS.shape[0], groups))
        if groups.stop_grad_G is not None:
            decision = stop_gradient_rows(decision, groups.stop_grad_G)
        y_N = self._combine(x_BS.reshape(-1, *x_BS.shape[2:]), decision, groups.sizes_G)
        return MoEOutput(y=restore(y_N), aux=dict(decision.aux), decision=decision)

    def groups(self, x_BS: Tensor, mask: Tensor | None) -> RoutingGroups:
        """The routing groups of ``[B, S, ...]``: examples, or causal segments when ``segment_len`` is set."""
        if not self.experts.token_input:  # images: one group per image, routed on its pooled features
            if mask is not None:
                raise ValueError("mask is for sequences [B, S, D]; conv expert banks route whole images")
            B = x_BS.shape[0]
            ones = torch.ones(B, dtype=torch.long, device=x_BS.device)
            return RoutingGroups(self.experts.router_features(x_BS[:, 0]), ones, torch.arange(B, device=x_BS.device))
        if self.segment_len is not None:
            return causal_segment_groups(x_BS, mask, self.segment_len, self.first_segment)
        return example_groups(x_BS, mask)

    def _combine(self, x_N: Tensor, decision: RoutingDecision, sizes_G: Tensor) -> Tensor:
        per_position = expand_decision(decision, sizes_G, x_N.shape[0])
        if self.combine == "sparse":
            return dispatch(self.experts, x_N, per_position)
        return combine_dense(self.experts, x_N, per_position.gates_TE())

    def _as_sequences(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """View the input as ``[B, S, ...]`` and return a function restoring the output's shape."""
        check_layer_input(x, self.experts)
        if x.dim() > 0 and x.shape[0] == 0:
            raise ValueError(f"input has an empty batch: shape {tuple(x.shape)}")
        if not self.experts.token_input:
            self.experts.as_tokens(x)  # validates [N, C, H, W]
            return x.unsqueeze(1), lambda y: y
        D = self.experts.dim
        if x.dim() not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"input must be [B, S, {D}] or [B, {D}], got shape {tuple(x.shape)}")
        if x.dim() == 2:
            if self.segment_len is not None:
                raise ValueError(f"causal segment routing needs sequences [B, L, {D}], got shape {tuple(x.shape)}")
            return x.unsqueeze(1), lambda y: y.reshape(x.shape[0], -1)
        return x, lambda y: y.reshape(x.shape[0], x.shape[1], -1)

    def extra_repr(self) -> str:
        if self.segment_len is None:
            return f"combine={self.combine!r}"
        return f"combine={self.combine!r}, segment_len={self.segment_len}, first_segment={self.first_segment!r}"


def _group_meta(meta: Mapping[str, Any] | None, batch: int, groups: RoutingGroups) -> dict[str, Any] | None:
    """Per-example metadata (tensors ``[B]``) expanded to one value per routing group."""
    if meta is None:
        return None
    expand = groups.example_G.shape[0] != batch
    out = {}
    for key, value in meta.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            if value.shape[0] != batch:
                raise ValueError(f"meta[{key!r}] has {value.shape[0]} entries but the batch has {batch} examples")
            if expand:
                value = value[groups.example_G.to(value.device)]
        out[key] = value
    return out
