"""Collectives used by expert parallelism, each turning a backend failure into a clear error.

* ``all_to_all``: ``torch.distributed.all_to_all_single`` with uneven splits as an autograd
  function (the backward is the same exchange with the splits swapped);
* ``exchange_counts``: the small non-differentiable all-to-all of per-expert token counts;
* ``all_reduce_sum``: a count reducer for balancers (global routing statistics);
* ``check_same_config``: all ranks must build the same layer (hash all-gathered, descriptions on mismatch).

Every collective is labelled with ``torch.profiler.record_function`` (``moekit.ep.*``) so that
profilers and the benchmark can split time between communication and compute.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.profiler import record_function

__all__ = ["ExpertParallelError", "all_to_all", "exchange_counts", "all_reduce_sum", "check_same_config", "guarded"]

T = TypeVar("T")


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed (a peer died, hung past the timeout, or
    ran a different program)."""


def _where(group: ProcessGroup | None, rank: int | None) -> str:
    """``"rank R in the group of ranks [...]"``, or (no group yet) the rank given or set by the launcher."""
    if group is not None and dist.is_initialized():
        return f"rank {dist.get_rank()} in the group of ranks {dist.get_process_group_ranks(group)}"
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
    return f"rank {rank} during the process-group set-up"


def guarded(what: str, group: ProcessGroup | None, fn: Callable[[], T], timeout_s: float | None = None, *,
            rank: int | None = None) -> T:
    """Run the collective ``fn``; re-raise a backend error as ``ExpertParallelError`` saying which
    operation failed on which rank and within which group (``group=None``: a set-up step such as
    ``init_process_group``, ``new_group`` or the DDP construction, where a peer killed before or while
    connecting shows up as gloo's "Connection reset/closed by peer" or a store "Wait timeout"; ``rank``
    names this process before the default group exists)."""
    try:
        return fn()
    except RuntimeError as err:  # DistBackendError, DistStoreError and gloo/NCCL timeouts are RuntimeErrors
        if isinstance(err, ExpertParallelError):
            raise
        limit = "" if timeout_s is None else f" (process-group timeout {timeout_s:g}s)"
        raise ExpertParallelError(
            f"{what} failed on {_where(group, rank)}{limit}: a peer rank probably died, is stuck, or runs a different "
            f"number of layers/steps. Backend error: {str(err).strip()[:500]}"
        ) from err


def _exchange(x_N: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup, what: str,
              timeout_s: float | None) -> Tensor:
    x_N = x_N.contiguous()
    out = x_N.new_empty((sum(out_splits), *x_N.shape[1:]))
    with record_function("moekit.ep.all_to_all"):
        guarded(what, group, lambda: dist.all_to_all_single(out, x_N, out_splits, in_splits, group=group), timeout_s)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows ``x_N`` split by ``in_splits`` go to the group's ranks; ``out_splits`` rows come back."""

    @staticmethod
    def forward(ctx, x_N: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup,  # type: ignore[override]
                what: str, timeout_s: float | None) -> Tensor:
        ctx.args = (out_splits, in_splits, group, what, timeout_s)
        return _exchange(x_N, out_splits, in_splits, group, what, timeout_s)

    @staticmethod
    def backward(ctx, grad_M: Tensor):  # type: ignore[override]
        out_splits, in_splits, group, what, timeout_s = ctx.args
        grad_N = _exchange(grad_M, in_splits, out_splits, group, f"{what} (backward)", timeout_s)
        return grad_N, None, None, None, None, None


def all_to_all(
    x_N: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: ProcessGroup,
    *,
    keep_graph: bool = False,
    what: str = "all_to_all",
    timeout_s: float | None = None,
) -> Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with uneven splits.

    Args:
        x_N: ``[N, ...]`` rows; the first ``in_splits[0]`` go to group rank 0, and so on.
        out_splits: rows received from each group rank (``sum`` = rows returned).
        in_splits: rows sent to each group rank (``sum == N``).
        keep_graph: take part in the backward exchange even when ``x_N`` needs no gradient. Every
            rank of the group must run the backward when any does (it is a collective), so callers
            set this when *some* rank needs gradients.
    Returns:
        ``[sum(out_splits), ...]`` (``x_N`` itself in a group of one rank).
    """
    if dist.get_world_size(group) == 1:
        return x_N
    if keep_graph and torch.is_grad_enabled() and not x_N.requires_grad:
        x_N = x_N.detach().requires_grad_()
    return _AllToAll.apply(x_N, out_splits, in_splits, group, what, timeout_s)


def exchange_counts(send_RC: Tensor, group: ProcessGroup, *, timeout_s: float | None = None) -> Tensor:
    """Row ``r`` of ``send_RC`` goes to group rank ``r``; returns ``recv_RC`` with row ``r`` from rank ``r``."""
    if dist.get_world_size(group) == 1:
        return send_RC
    recv = torch.empty_like(send_RC)
    with record_function("moekit.ep.exchange_counts"):
        guarded("all_to_all of token counts", group,
                lambda: dist.all_to_all_single(recv, send_RC.contiguous(), group=group), timeout_s)
    return recv


def all_reduce_sum(x: Tensor, group: ProcessGroup, *, timeout_s: float | None = None) -> Tensor:
    """A summed copy of ``x`` over the group (the input is left unchanged)."""
    out = x.detach().clone()
    with record_function("moekit.ep.all_reduce"):
        guarded("all_reduce", group, lambda: dist.all_reduce(out, group=group), timeout_s)
    return out


def _gather_bytes(data: bytes, group: ProcessGroup, device: torch.device, timeout_s: float | None) -> list[bytes]:
    size = len(dist.get_process_group_ranks(group))
    n = torch.tensor([len(data)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    guarded("all_gather of config sizes", group, lambda: dist.all_gather(sizes, n, group=group), timeout_s)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    parts = [torch.zeros_like(buf) for _ in range(size)]
    guarded("all_gather of configs", group, lambda: dist.all_gather(parts, buf, group=group), timeout_s)
    return [bytes(p[: int(s.item())].cpu().tolist()) for p, s in zip(parts, sizes)]


def check_same_config(description: str, group: ProcessGroup, *, device: torch.device | None = None,
                      what: str = "layer", timeout_s: float | None = None) -> None:
    """Raise ``ValueError`` on every rank when the ranks' ``description`` strings differ.

    One all-gather of an 8-byte hash; the full descriptions are gathered only on mismatch, so the
    error can show which ranks differ and how.
    """
    device = torch.device("cpu") if device is None else device
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.long, device=device)
    ranks = dist.get_process_group_ranks(group)
    hashes = [torch.zeros_like(mine) for _ in ranks]
    guarded(f"config check of the {what}", group, lambda: dist.all_gather(hashes, mine, group=group), timeout_s)
    if len({int(h.item()) for h in hashes}) == 1:
        return
    texts = [b.decode() for b in _gather_bytes(description.encode(), group, device, timeout_s)]
    lines = "; ".join(f"rank {r}: {t}" for r, t in zip(ranks, texts))
    raise ValueError(f"mismatched {what} configs across ranks {ranks} (every rank must build the same {what}): {lines}")
