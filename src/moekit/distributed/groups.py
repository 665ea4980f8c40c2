"""Process-group layout for expert parallelism: ``world = dp x ep``.

Rank ``r`` sits at ``(dp_rank, ep_rank) = divmod(r, ep_size)``:

* the **expert-parallel group** (``ep_group``, ``ep_size`` ranks with consecutive ids) holds one full
  set of E experts, ``E / ep_size`` per rank; the token all-to-alls run inside it. Consecutive ranks
  are the processes of one machine under ``torchrun``, so the all-to-all stays on the fast
  intra-node links (the "hierarchy" of docs/distributed.md);
* the **expert data-parallel group** (``dp_group``, ``dp_size`` ranks, stride ``ep_size``) holds
  replicas of the same expert shard; expert gradients are all-reduced there (only when ``dp_size > 1``);
* the **dense group** (``world_group``, every rank) replicates the non-expert parameters (routers,
  embeddings, heads): DistributedDataParallel and the balancers' statistics use it.

Every group is created with the same finite timeout, so a dead or stuck peer turns into an error
instead of a hang (gloo honours the timeout per group; ``new_group`` without one would wait forever).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .._checks import check_choice, check_int, check_positive
from .comm import guarded

__all__ = ["ExpertParallelGroups", "init_distributed", "make_groups", "default_backend"]

DEFAULT_TIMEOUT_S = 300.0


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(
    *,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Initialise the default process group (no-op when already initialised).

    Under ``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) is enough; pass
    ``init_method`` (e.g. ``"file:///tmp/store"``) with ``rank`` and ``world_size`` otherwise.
    With NCCL the process binds to GPU ``LOCAL_RANK``. A peer that dies or never comes before every
    rank has joined raises ``ExpertParallelError`` (after at most ``timeout_s``).
    """
    if dist.is_initialized():
        return
    backend = default_backend() if backend is None else check_choice("backend", backend, ["gloo", "nccl"])
    timeout = datetime.timedelta(seconds=check_positive("timeout_s", timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    guarded("init_process_group", None,
            lambda: dist.init_process_group(backend, init_method=init_method, timeout=timeout, **kwargs), timeout_s,
            rank=rank)


@dataclass(frozen=True, eq=False)
class ExpertParallelGroups:
    """The groups of one rank (see the module docstring for the layout)."""

    rank: int
    world_size: int
    ep_size: int
    dp_size: int
    ep_rank: int
    dp_rank: int
    ep_group: ProcessGroup
    dp_group: ProcessGroup
    world_group: ProcessGroup
    ep_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    timeout_s: float
    backend: str

    @property
    def device(self) -> torch.device:
        """Where tensors must live for this backend: the rank's GPU for NCCL, else CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} (ep {self.ep_rank}/{self.ep_size} in ranks {list(self.ep_ranks)}, "
            f"dp {self.dp_rank}/{self.dp_size} in ranks {list(self.dp_ranks)}, backend {self.backend}, "
            f"timeout {self.timeout_s:g}s)"
        )


def _new_group(ranks: list[int], timeout: datetime.timedelta, timeout_s: float) -> ProcessGroup:
    """``dist.new_group`` (collective: it connects the ranks), a dead peer raising ``ExpertParallelError``."""
    return guarded(f"new_group of ranks {ranks}", None, lambda: dist.new_group(ranks, timeout=timeout), timeout_s)


def make_groups(ep_size: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExpertParallelGroups:
    """Create the expert-parallel, expert data-parallel and dense groups on every rank.

    Must be called by all ranks in the same order (``new_group`` is collective).

    Args:
        ep_size: ranks that share one set of experts (default: the whole world, i.e. ``dp_size = 1``).
            Must divide the world size.
        timeout_s: timeout of every collective in these groups.

    Raises ``ExpertParallelError`` when a peer dies (or hangs past ``timeout_s``) while the groups connect.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call moekit.distributed.init_distributed() "
            "(or run under torchrun) before make_groups()"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_size = world if ep_size is None else check_int("ep_size", ep_size, low=1)
    if world % ep_size:
        raise ValueError(
            f"ep_size={ep_size} must divide the world size {world} (world = dp_size x ep_size); "
            f"allowed: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    timeout = datetime.timedelta(seconds=check_positive("timeout_s", timeout_s))
    dp_size = world // ep_size
    dp_rank, ep_rank = divmod(rank, ep_size)
    ep_group = dp_group = None
    for d in range(dp_size):  # every rank creates every group, in the same order
        ranks = list(range(d * ep_size, (d + 1) * ep_size))
        group = _new_group(ranks, timeout, timeout_s)
        if d == dp_rank:
            ep_group, ep_ranks = group, tuple(ranks)
    for e in range(ep_size):
        ranks = list(range(e, world, ep_size))
        group = _new_group(ranks, timeout, timeout_s)
        if e == ep_rank:
            dp_group, dp_ranks = group, tuple(ranks)
    world_group = _new_group(list(range(world)), timeout, timeout_s)
    assert ep_group is not None and dp_group is not None
    return ExpertParallelGroups(
        rank=rank, world_size=world, ep_size=ep_size, dp_size=dp_size, ep_rank=ep_rank, dp_rank=dp_rank,
        ep_group=ep_group, dp_group=dp_group, world_group=world_group, ep_ranks=ep_ranks, dp_ranks=dp_ranks,
        timeout_s=float(timeout_s), backend=dist.get_backend(),
    )
