"""Move a module's large CPU tensors onto transparent huge pages (2 MiB), for memory-bound CPU inference.

Decoding on a CPU streams every touched expert's weights from memory once per token, so the read rate is the
speed limit. Where transparent huge pages run in ``madvise`` mode (the default of Debian and Ubuntu) a tensor
gets them only if its memory was advised ``MADV_HUGEPAGE`` before it was first touched: torch's allocator does
so only with ``THP_MEM_ALLOC_ENABLE=1`` set before it starts, and weights a loader left memory-mapped from a
file sit in the page cache, usually on 4 KiB pages. :func:`to_huge_pages` copies each large tensor into a fresh
anonymous mapping advised ``MADV_HUGEPAGE`` (its start aligned to 2 MiB, the last partial huge page left on 4 KiB
pages so that no memory is wasted) and points the parameter or buffer at it; tensors sharing memory keep sharing
it.

Measured on an AMD EPYC (Zen 4) VM, whole MoE layers at decode, in one process: ``benchmarks/bench_pages.py``.
Other machines differ (ik_llama.cpp reports +0.5-1% on a Ryzen 7950X and -20% on a Threadripper 5975WX), so
measure before keeping it.
"""

from __future__ import annotations

import bisect
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

HUGE_PAGE = 2 << 20  #: bytes of one transparent huge page on x86-64 and most aarch64 kernels
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SMAPS = Path("/proc/self/smaps")


@dataclass(frozen=True)
class HugePageReport:
    """What :func:`to_huge_pages` did: ``tensors`` parameters and buffers (``storages`` distinct memory blocks,
    ``moved_bytes`` in all) now on advised mappings; ``huge_bytes`` of those blocks the kernel backs with huge
    pages (``AnonHugePages`` in ``/proc/self/smaps``; None where it cannot be read); ``skipped_bytes`` in
    blocks that already were on advised memory; ``mode``: the THP mode."""

    tensors: int
    storages: int
    moved_bytes: int
    huge_bytes: int | None
    skipped_bytes: int
    mode: str

    def summary(self) -> str:
        huge = "unknown" if self.huge_bytes is None else f"{self.huge_bytes / 2**20:.0f} MiB"
        return (f"{self.tensors} tensors ({self.storages} blocks, {self.moved_bytes / 2**20:.0f} MiB) moved onto "
                f"advised memory, {huge} of it on huge pages (THP mode {self.mode}); "
                f"{self.skipped_bytes / 2**20:.0f} MiB already there")  # fmt: skip


def thp_mode() -> str | None:
    """The transparent-huge-page mode (``always``, ``madvise`` or ``never``); None where the kernel has none."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    huge_kb: int
    advised: bool


def _mappings() -> list[_Mapping]:
    """This process's memory mappings from ``/proc/self/smaps``, sorted by start address ([] if unreadable)."""
    try:
        lines = SMAPS.read_text().splitlines()
    except OSError:
        return []
    found: list[_Mapping] = []
    start = end = huge = 0
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = head.split("-")
            start, end, huge = int(lo, 16), int(hi, 16), 0
        elif head == "AnonHugePages:":
            huge = int(line.split()[1])
        elif head == "VmFlags:":
            found.append(_Mapping(start, end, huge, "hg" in line.split()[1:]))
    return sorted(found, key=lambda m: m.start)


def _overlapping(maps: list[_Mapping], lo: int, hi: int) -> list[_Mapping]:
    """The mappings that overlap the addresses [lo, hi)."""
    i = max(bisect.bisect_right([m.start for m in maps], lo) - 1, 0)
    out = []
    while i < len(maps) and maps[i].start < hi:
        if maps[i].end > lo:
            out.append(maps[i])
        i += 1
    return out


def huge_page_bytes(*tensors: Tensor) -> int | None:
    """Bytes of the memory blocks under ``tensors`` that the kernel backs with transparent huge pages, from
    ``/proc/self/smaps`` (per mapping, each mapping counted once and at most its overlap with the blocks: an
    upper estimate where a mapping also holds other memory); None where smaps cannot be read."""
    maps = _mappings()
    if not maps:
        return None
    overlap: dict[_Mapping, int] = {}
    for t in tensors:
        lo = t.untyped_storage().data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        for m in _overlapping(maps, lo, hi):
            overlap[m] = overlap.get(m, 0) + min(hi, m.end) - max(lo, m.start)
    return sum(min(m.huge_kb * 1024, n) for m, n in overlap.items())


def _advised_block(nbytes: int) -> Tensor:
    """``nbytes`` of fresh anonymous memory as a uint8 tensor (the tensor keeps the mapping alive): its start
    aligned to a huge page, its whole huge pages advised ``MADV_HUGEPAGE``, the partial last one
    ``MADV_NOHUGEPAGE`` (4 KiB pages: no huge page half used). Nothing is touched here."""
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    skip = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    full = nbytes - nbytes % HUGE_PAGE
    if full:
        area.madvise(mmap.MADV_HUGEPAGE, skip, full)
    area.madvise(mmap.MADV_NOHUGEPAGE, skip + full, len(area) - skip - full)  # both page-aligned
    return torch.frombuffer(area, dtype=torch.uint8, count=nbytes, offset=skip)  # its storage: these bytes only


def thp_support() -> str:
    """The THP mode when :func:`to_huge_pages` can take effect here (``always`` or ``madvise``); raises
    ``RuntimeError`` saying why not (not Linux, no THP in the kernel, THP off)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        raise RuntimeError(f"to_huge_pages needs Linux transparent huge pages (madvise); this platform is {sys.platform!r}")
    mode = thp_mode()
    if mode is None:
        raise RuntimeError(f"this kernel has no transparent huge pages ({THP_ENABLED} is missing)")
    if mode == "never":
        raise RuntimeError(f"transparent huge pages are off ({THP_ENABLED}: never); an administrator can set "
                           "'madvise' (echo madvise > that file) for to_huge_pages to take effect")  # fmt: skip
    return mode


Holders = dict[int, list[tuple[nn.Module, str, Tensor]]]


def _holders(module: nn.Module, min_bytes: int) -> tuple[Holders, int]:
    """``{memory block address: [(owner module, name, tensor), ...]}`` for the CPU parameters and buffers of
    ``module`` on blocks of at least ``min_bytes`` (a parameter tied across modules once: one object), and the
    largest block seen."""
    holders: Holders = {}
    largest, seen = 0, set()
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(owner, kind).items():
                if t is None or t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or id(t) in seen:
                    continue
                if kind == "_parameters":
                    seen.add(id(t))
                nbytes = t.untyped_storage().nbytes()
                largest = max(largest, nbytes)
                if nbytes >= min_bytes:
                    holders.setdefault(t.untyped_storage().data_ptr(), []).append((owner, name, t))
    return holders, largest


def _move_block(users: list[tuple[nn.Module, str, Tensor]]) -> tuple[Tensor, int]:
    """Copy the memory block under ``users`` onto a fresh advised block and point each of them at it (the same
    strides and offsets); returns the block and how many tensors moved. Its own frame: once it returns nothing
    here holds the old block."""
    old = users[0][2].untyped_storage()
    block = _advised_block(old.nbytes())
    with torch.no_grad():
        block.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
    for owner, name, t in users:
        view = block.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
        if isinstance(t, nn.Parameter):
            t.data = view
        else:
            owner._buffers[name] = view
    return block, len(users)


def to_huge_pages(module: nn.Module, *, min_bytes: int = HUGE_PAGE, progress: bool = False) -> HugePageReport:
    """Copy every CPU parameter and buffer of ``module`` whose memory block holds at least ``min_bytes`` onto
    memory advised for transparent huge pages, in place (the ``nn.Parameter`` objects stay, so optimizers and
    hooks keep working); returns what moved. One block at a time: the peak extra memory is the largest block,
    provided nothing else holds the old tensors. Blocks already on advised memory are left (a second call moves
    nothing); ``progress``: a bar (MiB copied) on a terminal. Raises where the platform has no huge pages, and
    ``ValueError`` if no tensor is large enough."""
    from ..progress import Progress

    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 1:
        raise ValueError(f"min_bytes must be a positive int, got {min_bytes!r}")
    mode = thp_support()
    holders, largest = _holders(module, min_bytes)
    if not holders:
        raise ValueError(f"{type(module).__name__} has no CPU parameter or buffer of at least min_bytes={min_bytes} "
                         f"bytes (its largest memory block holds {largest})")  # fmt: skip
    maps = _mappings()
    tensors = moved = skipped = 0
    placed: list[Tensor] = []
    total_mib = sum(users[0][2].untyped_storage().nbytes() for users in holders.values()) >> 20
    with Progress("auto" if progress else "off").task(total=total_mib, desc="to huge pages (MiB)") as task:
        for ptr in list(holders):
            nbytes = holders[ptr][0][2].untyped_storage().nbytes()
            here = _overlapping(maps, ptr, ptr + nbytes)
            if here and all(m.advised for m in here):
                skipped += nbytes
                del holders[ptr]
            else:
                block, count = _move_block(holders.pop(ptr))
                placed.append(block)
                tensors, moved = tensors + count, moved + nbytes
            task.advance(nbytes >> 20)
    return HugePageReport(tensors, len(placed), moved, huge_page_bytes(*placed), skipped, mode)
