"""Per-example routing over an expert bank: SMEAR's merged expert and the baselines it is compared with.

One routing decision per example, computed from a pooled view of the example (masked mean over
positions, or global average pooling for images), then one of three combines:

* ``"merge"`` -- SMEAR (Muqeeth et al. 2023, https://arxiv.org/abs/2306.03745): the example runs a
  single expert whose parameters are the routing-weighted average of all experts' parameters.
  Merged parameters for the batch come from one matmul over the flattened stacked parameters and
  are applied with the bank's grouped kernel (groups = examples).
* ``"sparse"`` -- the example's positions run only the chosen experts (tag, hash, top-1, ST-Gumbel,
  REINFORCE, DSelect-k): the decision is broadcast to positions and dispatched as usual.
* ``"dense"`` -- output ensemble: every expert runs, outputs mixed by the router (E x compute).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_choice, check_int
from ..experts.base import ExpertBank
from ..experts.dispatch import combine_dense, dispatch
from ..routers.base import Router
from ..types import MoEOutput, RoutingDecision

__all__ = ["ExampleRoutedMoE", "masked_mean", "merged_forward"]

COMBINES = ("merge", "sparse", "dense")


def masked_mean(x_BSD: Tensor, mask_BS: Tensor | None) -> Tensor:
    """Mean over positions of ``[B, S, D]``, counting only positions where ``mask`` is true/1.

    (The official SMEAR code averages padding in; moekit does not.) Raises on empty sequences and
    on examples whose mask is all padding.
    """
    if x_BSD.shape[1] == 0:
        raise ValueError(f"cannot route empty sequences: input has shape {tuple(x_BSD.shape)}")
    if mask_BS is None:
        return x_BSD.mean(dim=1)
    if mask_BS.shape != x_BSD.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(x_BSD.shape[:2])} (batch, positions), got {tuple(mask_BS.shape)}")
    m = mask_BS.to(x_BSD.dtype)
    count = m.sum(1)
    if bool((count == 0).any()):
        bad = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"examples {bad[:10]} have an all-padding mask; nothing to route on")
    return (x_BSD * m.unsqueeze(-1)).sum(1) / count.unsqueeze(-1)


def merged_forward(experts: ExpertBank, x_N: Tensor, probs_GE: Tensor, sizes_G: Tensor) -> Tensor:
    """Run group g's rows through the expert merged with ``probs_GE[g]``: ``[N, ...] -> [N, out]``."""
    return experts.grouped_forward(x_N, experts.merge_parameters(probs_GE), sizes_G)


class ExampleRoutedMoE(nn.Module):
    """Route each example once and combine experts by ``combine`` (see module docstring).

    Args:
        router: any moekit router over ``experts.dim`` features (sees the pooled example).
        experts: an expert bank (adapter, mlp, glu, conv).
        combine: ``"merge"`` | ``"sparse"`` | ``"dense"``.
        merge_chunk_bytes: SMEAR materialises one merged parameter set per example (B x P values).
            When that exceeds this budget in training, examples are merged and run in chunks under
            activation checkpointing, so the merged copies are rebuilt in backward instead of kept.

    Input: ``[B, S, D]`` sequences (with optional ``mask [B, S]``), ``[B, D]`` vectors, or
    ``[B, C, H, W]`` images for conv banks. Returns ``MoEOutput`` with ``y`` shaped like the input
    (last dim ``out_dim``) and a decision with one row per example.
    """

    def __init__(
        self,
        router: Router,
        experts: ExpertBank,
        *,
        combine: str = "merge",
        merge_chunk_bytes: int = 256 * 2**20,
    ) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(f"router has num_experts={router.num_experts}, experts has {experts.num_experts}")
        if router.dim != experts.dim:
            raise ValueError(f"router has dim={router.dim} but experts has dim={experts.dim}")
        self.router = router
        self.experts = experts
        self.combine = check_choice("combine", combine, COMBINES)
        if combine == "merge" and router.is_sparse and router.k > 1:
            raise ValueError("combine='merge' needs a router whose weights cover the experts it merges")
        self.merge_chunk_bytes = check_int("merge_chunk_bytes", merge_chunk_bytes, low=1)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        x_BSD, restore = self._as_sequences(x)
        B, S = x_BSD.shape[0], x_BSD.shape[1]
        pooled = self.experts.router_features(x_BSD[:, 0]) if not self.experts.token_input else masked_mean(x_BSD, mask)
        decision = self.router(pooled, meta=_per_example_meta(meta, B))
        if self.combine == "merge":
            y_N = self._merge(x_BSD, decision.gates_TE())
        else:
            x_N = x_BSD.reshape(B * S, *x_BSD.shape[2:])
            per_position = _broadcast(decision, S)
            if self.combine == "sparse":
                y_N = dispatch(self.experts, x_N, per_position)
            else:
                y_N = combine_dense(self.experts, x_N, per_position.gates_TE())
        return MoEOutput(y=restore(y_N), aux=dict(decision.aux), decision=decision)

    def _merge(self, x_BSD: Tensor, probs_BE: Tensor) -> Tensor:
        B, S = x_BSD.shape[:2]
        x_N = x_BSD.reshape(B * S, *x_BSD.shape[2:])
        per_example = sum(p[0].numel() * p.element_size() for p in self.experts.stacked_parameters().values())
        chunk = max(1, self.merge_chunk_bytes // per_example)
        pieces = []
        for start in range(0, B, chunk):
            probs = probs_BE[start : start + chunk]
            rows = x_N[start * S : (start + probs.shape[0]) * S]
            sizes = torch.full((probs.shape[0],), S, dtype=torch.long, device=x_N.device)
            if chunk < B and torch.is_grad_enabled():
                pieces.append(checkpoint(merged_forward, self.experts, rows, probs, sizes, use_reentrant=False))
            else:
                pieces.append(merged_forward(self.experts, rows, probs, sizes))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _as_sequences(self, x: Tensor):
        """View the input as ``[B, S, ...]`` and return a function restoring the output's shape."""
        if not self.experts.token_input:
            self.experts.as_tokens(x)  # validates [N, C, H, W]
            return x.unsqueeze(1), lambda y: y
        if x.dim() < 2 or x.shape[-1] != self.experts.dim:
            raise ValueError(f"input must be [B, S, {self.experts.dim}] or [B, {self.experts.dim}], got {tuple(x.shape)}")
        if x.dim() == 2:
            return x.unsqueeze(1), lambda y: y.reshape(x.shape[0], -1)
        if x.dim() != 3:
            raise ValueError(f"input must be [B, S, D] or [B, D], got shape {tuple(x.shape)}")
        return x, lambda y: y.reshape(x.shape[0], x.shape[1], -1)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


def _broadcast(decision: RoutingDecision, positions: int) -> RoutingDecision:
    """Repeat each example's decision for its ``positions`` positions (sparse and dense combines)."""
    rep = lambda t: None if t is None else t.repeat_interleave(positions, dim=0)  # noqa: E731
    return replace(
        decision,
        ids_TK=rep(decision.ids_TK),
        weights_TK=rep(decision.weights_TK),
        kept_TK=rep(decision.kept_TK),
        logits_TE=rep(decision.logits_TE),
        probs_TE=rep(decision.probs_TE),
        load_prob_TE=None,
        extras={},
    )


def _per_example_meta(meta: Mapping[str, Any] | None, batch: int) -> dict[str, Any] | None:
    if meta is None:
        return None
    out = {}
    for key, value in meta.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] != batch:
            raise ValueError(f"meta[{key!r}] has {value.shape[0]} entries but the batch has {batch} examples")
        out[key] = value
    return out
