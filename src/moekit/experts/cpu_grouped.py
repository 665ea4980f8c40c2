"""CPU execution of the grouped matmul's large products: the groups split over threads.

The CPU ``F.grouped_mm`` is a serial loop of one GEMM per group, each split over all intra-op
threads: with many small groups (64 experts of ~256 rows) every GEMM pays an OpenMP fork/join and
parallelises poorly. Here each of n worker threads takes a contiguous run of whole groups with about
1/n of the rows and runs its GEMMs on one intra-op thread. Large groups (E=8 experts of ~2048 rows)
keep the plain kernel: its GEMMs parallelise well and the split measured no gain there.

Intra-op thread counts are per thread in ATen (``omp_set_num_threads``, ``mkl_set_num_threads_local``),
so the workers are set to one thread each; ``torch.set_num_threads`` also stores a process-wide
default that new threads start from, which the pool restores to the caller's count right after.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_IMBALANCE", "MAX_SPLIT_ROWS", "MIN_SPLIT_MACS", "RowSplit", "run_split", "split_by_cost", "split_groups"]

MIN_SPLIT_MACS = 2**26  # below this many multiply-adds per product the plain kernel is used
MAX_SPLIT_ROWS = 1024  # auto mode splits only when the mean rows per non-empty group is below this
MAX_IMBALANCE = 1.25  # auto mode keeps one run when a thread would get more than this x its share

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()
_WORKERS: set[int] = set()  # thread ids of pool workers (a worker runs its products inline)


@dataclass(frozen=True)
class RowSplit:
    """Groups ``runs[i] = (g0, g1)`` go to task i; group g owns rows ``starts[g]:starts[g + 1]``."""

    runs: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]


def split_groups(offs_G: Tensor, w_GOI: Tensor, threads: int | None) -> RowSplit | None:
    """Plan the products over runs (at least 2) of consecutive groups, or None to keep the plain kernel.

    Args:
        offs_G: ``[G]`` cumulative row counts (the ``grouped_mm`` offsets).
        w_GOI: ``[G, O, I]`` weights (only the shape is used, for the work estimate).
        threads: runs to split into (1: no split); ``None``: the caller's ``torch.get_num_threads()``,
            and only for products of at least ``MIN_SPLIT_MACS`` multiply-adds over groups of fewer
            than ``MAX_SPLIT_ROWS`` rows on average that split evenly (``MAX_IMBALANCE``).
    """
    ends = offs_G.tolist()
    N, G = ends[-1], len(ends)
    if threads is None and (N * w_GOI.shape[1] * w_GOI.shape[2] < MIN_SPLIT_MACS or torch.compiler.is_compiling()):
        return None
    n = _intra_op_threads() if threads is None else threads
    starts = (0, *ends)
    if n < 2 or G < 2 or threading.get_ident() in _WORKERS:
        return None
    if threads is None and N >= MAX_SPLIT_ROWS * sum(1 for a, b in zip(starts, ends) if b > a):
        return None
    cuts = [0]
    for k in range(1, n):  # the group boundary nearest to each k/n of the rows
        target = k * N / n
        b = bisect.bisect_left(starts, target)
        if b > G or (b > 0 and target - starts[b - 1] <= starts[b] - target):
            b -= 1
        if b > cuts[-1]:
            cuts.append(b)
    if cuts[-1] < G:
        cuts.append(G)
    runs = tuple(itertools.pairwise(cuts))
    if len(runs) < 2 or (threads is None and max(starts[b] - starts[a] for a, b in runs) > MAX_IMBALANCE * N / n):
        return None
    return RowSplit(runs, starts)


def split_by_cost(costs: list[float], starts: tuple[int, ...], threads: int) -> RowSplit | None:
    """Runs of consecutive groups with about equal total ``costs`` (at most ``threads`` runs), or None
    when fewer than two runs result or the caller is itself a pool worker.

    ``starts`` are the groups' row offsets (``len(costs) + 1`` values), as in ``RowSplit``.
    """
    G = len(costs)
    if threads < 2 or G < 2 or threading.get_ident() in _WORKERS:
        return None
    total, cuts, acc = sum(costs), [0], 0.0
    for g, c in enumerate(costs[:-1]):
        acc += c
        if acc >= len(cuts) * total / threads and len(cuts) < threads:
            cuts.append(g + 1)
    cuts.append(G)
    runs = tuple(itertools.pairwise(cuts))
    return RowSplit(runs, starts) if len(runs) > 1 else None


def _intra_op_threads() -> int:
    """The calling thread's intra-op thread count (the auto split's default)."""
    return torch.get_num_threads()


def run_split(split: RowSplit, fn: Callable[[int, slice], object]) -> None:
    """Call ``fn(g, rows_of_g)`` for every group (empty ones too), one pool task per run (a single run:
    in the calling thread), and wait.

    ``fn`` runs outside autograd (grad mode is per thread; the callers are autograd Functions or the
    inference path), in inference mode when the caller is (tensors it made may only be written there).
    """
    inference = torch.is_inference_mode_enabled()

    def task(g0: int, g1: int) -> None:
        with torch.inference_mode() if inference else torch.no_grad():
            for g in range(g0, g1):
                fn(g, slice(split.starts[g], split.starts[g + 1]))

    if len(split.runs) == 1:  # one run: in this thread
        task(*split.runs[0])
        return
    pool = _pool(len(split.runs))
    for future in [pool.submit(task, g0, g1) for g0, g1 in split.runs]:
        future.result()


def _pool(n: int) -> ThreadPoolExecutor:
    """The process's n-worker pool, its workers set to one intra-op thread each (created once)."""
    with _POOL_LOCK:
        if n not in _POOLS:
            caller_threads = torch.get_num_threads()
            ready = threading.Barrier(n + 1)

            def init() -> None:
                _WORKERS.add(threading.get_ident())
                torch.set_num_threads(1)
                ready.wait()

            pool = ThreadPoolExecutor(n, thread_name_prefix="moekit-groups", initializer=init)
            for _ in range(n):  # every submit starts a worker while the others wait at the barrier
                pool.submit(int)
            ready.wait()
            torch.set_num_threads(caller_threads)  # undo the process-wide default the workers changed
            _POOLS[n] = pool
        return _POOLS[n]


def _forget_pools() -> None:
    """In a forked child the workers do not exist: start new pools on demand."""
    _POOLS.clear()
    _WORKERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
