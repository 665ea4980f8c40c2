"""SMEAR: Soft Merging of Experts with Adaptive Routing (Muqeeth, Liu, Raffel; TMLR 2024,
https://arxiv.org/abs/2306.03745).

Each example is routed once, on the masked mean of its positions: ``p = softmax(W LayerNorm(mean x))``
(``SMEARRouter``: bias-free, small initial scale so routing starts near uniform, expert dropout with
renormalisation in training). The example then runs *one* expert whose parameters are the
``p``-weighted average of all experts' parameters. The merged parameters of the whole batch come from
one matmul over the flattened stacked parameters (``ExpertBank.merge_parameters``) and are applied with
the bank's grouped kernel, groups = examples (``ExpertBank.grouped_forward``). Everything is
differentiable: no gradient estimator is needed.

Cost (per example of S positions, one expert of P parameters): merging ~E*P multiply-adds, running
~S*P, so the overhead over one expert is about E/S. Memory: one merged copy per example (B*P values)
is kept for backward; for FFN experts and short sequences it can exceed the activations (about
S*(D+2F) values per example). ``merge_chunk_bytes`` bounds it: when the batch's merged copies would
exceed the budget, examples are merged and run in chunks under activation checkpointing, so at most one
chunk of merged parameters is alive, in forward and in backward (one extra merge + forward per chunk in
backward). ``segment_len`` routes causal segments instead of examples (Lory, ``segments.py``).

Fast path (``merged_forward_fused``), taken when the batch's merged parameters exceed
``min(merge_chunk_bytes, 16 MiB)``, for banks with ``forward_merged`` (adapter, MLP, gated MLP) and groups of
equal size (examples, or segments that divide the sequence): each linear layer runs ``merged_linear``, so
merged weights never exist for the whole layer (recomputed in backward instead of kept). On fp32 CPU
tensors with the native kernel (AVX-512) ``merged_linear`` runs the native merged products, which hold no
merged copy at all (FFN experts, ``benchmarks/bench_smear.py``: 1.2x one expert where torch's chunked loop
runs 1.4-1.7x); elsewhere torch's loop over chunks of output features, at most that budget merged at once.
``merged_forward`` is its reference and serves smaller merges (as fast there: adapters measured within noise
of the native products); other banks and unequal groups take ``merged_forward_chunked``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._checks import check_int
from ..experts.base import ExpertBank
from ..experts.merged_linear import DEFAULT_CHUNK_BYTES
from ..registry import DISPATCHERS
from ..routers.base import Router
from ..routers.smear import SMEARRouter
from ..types import RoutingDecision
from .dispatchers import Dispatcher
from .example_routed import ExampleRoutedMoE

__all__ = ["SMEAR", "MergeDispatch", "PlainMergeDispatch", "merged_forward", "merged_forward_chunked", "merged_forward_fused", "merged_bytes_per_group"]

DEFAULT_MERGE_CHUNK_BYTES = 256 * 2**20


def merged_bytes_per_group(experts: ExpertBank) -> int:
    """Bytes of one merged copy of an expert's parameters."""
    return sum(p[0].numel() * p.element_size() for p in experts.stacked_parameters().values())


def merged_forward(experts: ExpertBank, x_N: Tensor, probs_GE: Tensor, sizes_G: Tensor) -> Tensor:
    """Plain path: merge every group's expert at once and run it on the group's rows.

    Args:
        x_N: ``[N, D]`` rows (or ``[N, C, H, W]`` images), group by group.
        probs_GE: merge weights per group ``[G, E]``.
        sizes_G: rows per group ``[G]`` (sums to N).
    Returns:
        ``[N, out]`` (or images).
    """
    merged: Mapping[str, Tensor] = experts.merge_parameters(probs_GE)
    return experts.grouped_forward(x_N, merged, sizes_G)


def merged_forward_chunked(
    experts: ExpertBank, x_N: Tensor, probs_GE: Tensor, sizes_G: Tensor, *, max_bytes: int
) -> Tensor:
    """Memory-aware path: as ``merged_forward``, but at most ``max_bytes`` of merged parameters at once.

    Groups are processed in chunks of ``max(1, max_bytes // merged_bytes_per_group)``; with autograd on,
    each chunk runs under activation checkpointing so its merged parameters are rebuilt in backward
    instead of being kept. Equal to ``merged_forward`` in outputs and gradients.
    """
    G = probs_GE.shape[0]
    chunk = max(1, check_int("max_bytes", max_bytes, low=1) // max(1, merged_bytes_per_group(experts)))
    if chunk >= G:
        return merged_forward(experts, x_N, probs_GE, sizes_G)
    ends = torch.cumsum(sizes_G, 0).tolist()
    pieces = []
    for g0 in range(0, G, chunk):
        g1 = min(G, g0 + chunk)
        r0, r1 = (ends[g0 - 1] if g0 else 0), ends[g1 - 1]
        args = (experts, x_N[r0:r1], probs_GE[g0:g1], sizes_G[g0:g1])
        if torch.is_grad_enabled():
            pieces.append(checkpoint(merged_forward, *args, use_reentrant=False))
        else:
            pieces.append(merged_forward(*args))
    return torch.cat(pieces)


def merged_forward_fused(
    experts: ExpertBank, x_N: Tensor, probs_GE: Tensor, sizes_G: Tensor, *, max_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor | None:
    """Fast path: as ``merged_forward`` with every linear layer run by ``merged_linear`` (the bank's
    ``forward_merged``: merged weights built ``max_bytes`` at a time, never kept for backward). Returns
    ``None`` where it does not apply: a bank without a fused path, or groups of unequal size."""
    G, N = probs_GE.shape[0], x_N.shape[0]
    if type(experts).forward_merged is ExpertBank.forward_merged or G == 0 or N % G:
        return None
    if not bool((sizes_G == N // G).all()):
        return None
    x_GSI = x_N.reshape(G, N // G, x_N.shape[-1])
    y = experts.forward_merged(x_GSI, probs_GE, chunk_bytes=check_int("max_bytes", max_bytes, low=1))
    return None if y is None else y.reshape(N, y.shape[-1])


@DISPATCHERS.register("merge", paper="https://arxiv.org/abs/2306.03745")
class MergeDispatch(Dispatcher):
    """SMEAR's dispatcher: group g runs one expert whose parameters are ``sum_e p[g, e] * theta_e``.

    ``max_bytes`` bounds the merged parameters alive at once (``merge_chunk_bytes``). Groups large
    enough to pay for it take the fused path (``merged_forward_fused``); the others, and banks or
    groups it does not serve, take ``merged_forward_chunked`` (plain ``merged_forward`` within budget).
    """

    name = "merge"

    def __init__(self, max_bytes: int = DEFAULT_MERGE_CHUNK_BYTES) -> None:
        self.max_bytes = check_int("merge_chunk_bytes", max_bytes, low=1)

    def __call__(self, experts: ExpertBank, x_N: Tensor, decision: RoutingDecision, sizes_G: Tensor | None) -> Tensor:
        probs_GE = decision.gates_TE()
        if sizes_G is None:  # one row per group: merge per row
            sizes_G = torch.ones(x_N.shape[0], dtype=torch.long, device=x_N.device)
        budget = min(self.max_bytes, DEFAULT_CHUNK_BYTES)
        y = None
        if probs_GE.shape[0] * merged_bytes_per_group(experts) > budget:  # small merges: plain path is as fast
            y = merged_forward_fused(experts, x_N, probs_GE, sizes_G, max_bytes=budget)
        if y is None:
            y = merged_forward_chunked(experts, x_N, probs_GE, sizes_G, max_bytes=self.max_bytes)
        return y

    def __repr__(self) -> str:
        return f"MergeDispatch(max_bytes={self.max_bytes})"


class PlainMergeDispatch(Dispatcher):
    """The reference of ``MergeDispatch``: every group's merged expert built at once (``merged_forward``)."""

    name = "merge"

    def __call__(self, experts: ExpertBank, x_N: Tensor, decision: RoutingDecision, sizes_G: Tensor | None) -> Tensor:
        if sizes_G is None:
            sizes_G = torch.ones(x_N.shape[0], dtype=torch.long, device=x_N.device)
        return merged_forward(experts, x_N, decision.gates_TE(), sizes_G)


class SMEAR(ExampleRoutedMoE):
    """SMEAR layer: per-example routing, one merged expert per example (``MoE`` with ``ExampleFeatures``
    and ``MergeDispatch``).

    Args:
        experts: any expert bank (adapter, mlp, glu, conv).
        router: a dense router (default: ``SMEARRouter`` built from the next two arguments).
        expert_dropout: probability of zeroing each routing probability in training (then renormalised).
        router_init_std: std of the router's initial weights (small: routing starts near uniform).
        merge_chunk_bytes: memory budget for merged parameters (see the module docstring).
        segment_len, first_segment: causal segment routing (Lory) instead of per-example routing.

    ``forward(x, *, mask=None, meta=None) -> MoEOutput``; inputs as in ``ExampleRoutedMoE``. The
    decision has K = E (every expert, weighted by the merge weights).
    """

    def __init__(
        self,
        experts: ExpertBank,
        router: Router | None = None,
        *,
        expert_dropout: float = 0.1,
        router_init_std: float = 1e-2,
        merge_chunk_bytes: int = DEFAULT_MERGE_CHUNK_BYTES,
        segment_len: int | None = None,
        first_segment: str = "self",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if router is None:
            router = SMEARRouter.for_bank(experts, expert_dropout=expert_dropout, init_std=router_init_std,
                                          device=device, dtype=dtype)  # fmt: skip
        elif isinstance(router, Router) and router.is_sparse:
            raise ValueError(
                f"SMEAR merges with the router's full distribution; got sparse router {type(router).__name__}"
            )
        super().__init__(router, experts, combine=MergeDispatch(merge_chunk_bytes), segment_len=segment_len,
                         first_segment=first_segment, device=device, dtype=dtype)  # fmt: skip

    @property
    def merge_chunk_bytes(self) -> int:
        """The memory budget for merged parameters (see the module docstring)."""
        return self.dispatcher.max_bytes

    @merge_chunk_bytes.setter
    def merge_chunk_bytes(self, value: int) -> None:
        self.dispatcher = MergeDispatch(value)
