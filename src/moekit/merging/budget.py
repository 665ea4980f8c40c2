"""The memory bound of a streamed compression (``--max-memory``): a plan from measurements, checked
before the run and again around every unit.

Before anything is read (``MemoryPlan.check``): the process's resident memory now (imports, the meta
skeleton) + ``UNIT_FACTOR`` x the largest unit's tensor bytes (the unit, its reduced copy, alignment
and merge temporaries, the load's conversion copies) + ``SLACK`` (allocator and statistics) must fit.
After the input check has run the first unit on one row of the largest calibration batch
(``MemoryPlan.add_activations``), ``ACTIVATION_FACTOR`` x the activation bytes measured there
(``LiveTensorBytes``: the peak bytes of tensors the forward created and still held, times the rows)
and the per-batch context that the pipeline keeps for every batch (masks, position embeddings) are
added, and the plan is checked again.

During the run (``BudgetedSource``, around the run's weight source): a unit's increment is the
process's peak (``VmHWM``) after the unit minus its resident memory before the unit was loaded (an
upper bound of what the unit took; not measured while the peak is still one from before the run).
Before each unit is loaded, the memory now + the largest increment so far (scaled up for a larger
unit) must fit, and after it the peak must be within the budget, else ``MemoryBudgetError`` stops
the run at that unit boundary, resumable with a larger budget. The budget is a bound moekit keeps by
refusing, not a limit the kernel enforces.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory import format_size, peak_rss_bytes, rss_bytes

__all__ = ["UNIT_FACTOR", "ACTIVATION_FACTOR", "SLACK", "MemoryBudgetError", "MemoryPlan", "LiveTensorBytes",
           "BudgetedSource", "storage_bytes"]  # fmt: skip

#: resident bytes per tensor byte of the largest unit before any unit ran: measured 3.1-3.7 (peak minus
#: the memory before the unit was loaded, over its bytes; an upper bound that includes the activations)
#: on 64-expert Qwen3-MoE layers with m-smoe (benchmarks/bench_compress.py)
UNIT_FACTOR = 4.0
#: resident bytes per measured activation byte: the pipeline's passes add the observer's copies and
#: the allocator's slack to the plain forward the meter sees (measured 1.65 on a small Qwen3-MoE whose
#: activations are 16x its layers: tests/test_memory_cap.py)
ACTIVATION_FACTOR = 2.0
#: fixed headroom: allocator slack, statistics, progress files (bytes)
SLACK = 48 * 10**6
#: smallest budgets in messages are rounded up to this (bytes)
ROUND = 10**7


class MemoryBudgetError(OSError):
    """The run would exceed (or exceeded) ``--max-memory`` at a unit boundary; the run directory is
    kept, so ``--resume`` with a larger ``--max-memory`` continues it. (Before the run a budget that
    cannot fit is a ``ValueError``.)"""


def storage_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct storages of the tensors among ``values`` (nested lists, tuples, dicts)."""
    seen: dict[int, int] = {}
    for t in tree_leaves(list(values)):
        if isinstance(t, Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class LiveTensorBytes(TorchDispatchMode):
    """Counts, while active, the bytes of the tensors that ops create and that are still alive; ``peak``
    is their largest total (the activations of a forward; tensors that existed before, such as weights,
    and views of them are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[Any, int]] = {}
        self.outside: dict[int, Any] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key not in self.live and key not in self.outside:
                    self.outside[key] = self._ref(t.untyped_storage())
        out = func(*args, **(kwargs or {}))
        self.sweep()
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.live and key not in self.outside and storage.nbytes():
                self.live[key] = (self._ref(storage), storage.nbytes())
                self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out

    def sweep(self) -> None:
        """Forget tensors that were freed (``now`` then counts the live ones only)."""
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
        for key, ref in list(self.outside.items()):  # a freed address may come back for a new tensor
            if ref.expired():
                del self.outside[key]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.sweep()


class MemoryPlan:
    """The memory a streamed run needs, against ``budget`` bytes (see the module docstring).

    Args:
        budget: the bound (``--max-memory``) in bytes.
        module_bytes: tensor bytes of every unit (and of the other modules) by module name.
        where: the checkpoint, for messages.
    """

    def __init__(self, budget: int, module_bytes: dict[str, int], where: str) -> None:
        self.budget, self.module_bytes, self.where = budget, dict(module_bytes), where
        self.start_rss = rss_bytes() or peak_rss_bytes()
        #: the process's peak before the run (a library caller's earlier work is not the run's)
        self.start_peak = peak_rss_bytes()
        self.largest = max(self.module_bytes.values(), default=0)
        self.activations = 0
        self.contexts = 0
        #: measured ``(increment, unit bytes)`` of units that ran
        self.measured: list[tuple[int, int]] = []

    def need(self) -> int:
        """Predicted peak of the run before any unit ran."""
        activations = int(ACTIVATION_FACTOR * self.activations)
        return self.start_rss + int(UNIT_FACTOR * self.largest) + activations + self.contexts + SLACK

    def check(self) -> None:
        """ValueError if ``need()`` exceeds the budget (naming the smallest budget that fits)."""
        need = self.need()
        if need > self.budget:
            parts = [f"this process uses {format_size(self.start_rss)}",
                     f"the largest unit of {self.where!r} ({format_size(self.largest)} of tensors) needs about "
                     f"{format_size(UNIT_FACTOR * self.largest)} while it is compressed"]  # fmt: skip
            if self.activations or self.contexts:
                parts.append(f"the largest calibration batch {format_size(ACTIVATION_FACTOR * self.activations)} with "
                             f"its activations ({format_size(self.activations)} measured) and "
                             f"the batches' contexts {format_size(self.contexts)}")  # fmt: skip
            else:
                parts.append("the calibration activations (measured next) more")
            enough = -(-need // ROUND) * ROUND  # the process's start varies by a few hundred kB between runs
            raise ValueError(
                f"--max-memory {format_size(self.budget)} is too small: {', '.join(parts)}, plus "
                f"{format_size(SLACK)} of headroom; give at least {format_size(enough)}"
            )

    def add_activations(self, activation_bytes: int, context_bytes: int) -> None:
        """Add the measured activations of one unit on the largest batch and the contexts kept for all
        batches, and check again."""
        self.activations, self.contexts = int(activation_bytes), int(context_bytes)
        self.check()

    def unit_need(self, size: int) -> int | None:
        """Predicted peak while a unit of ``size`` bytes runs from now, from the increments measured so
        far (scaled up for a larger unit); None before any unit was measured."""
        if not self.measured:
            return None
        now = rss_bytes() or peak_rss_bytes()
        return now + max(int(inc * max(1.0, size / max(b, 1))) for inc, b in self.measured)

    def check_peak(self, during: str) -> None:
        """MemoryBudgetError if the process's peak exceeds the budget (and was reached during the run)."""
        peak = peak_rss_bytes()
        if peak > self.budget and peak > self.start_peak:
            raise MemoryBudgetError(
                f"--max-memory {format_size(self.budget)} was exceeded: the peak resident memory reached "
                f"{format_size(peak)} while {during}; rerun with --resume and a larger --max-memory"
            )

    def as_dict(self) -> dict[str, int]:
        worst = max((inc for inc, _ in self.measured), default=0)
        return {"max_memory": self.budget, "estimate": self.need(), "start_rss": self.start_rss,
                "largest_unit": self.largest, "activations": self.activations, "contexts": self.contexts,
                "largest_unit_increment": worst}  # fmt: skip


class BudgetedSource:
    """A weight source that measures every unit it loads and refuses to load one that would not fit
    (``MemoryPlan.unit_need``); everything else is the wrapped source's."""

    def __init__(self, source: Any, plan: MemoryPlan, units: Sequence[str]) -> None:
        self.source, self.plan, self.units = source, plan, set(units)
        self._before: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def load(self, stack: Any, names: Sequence[str]) -> None:
        plan = self.plan
        for name in names:
            if name not in self.units:
                continue
            need = plan.unit_need(plan.module_bytes.get(name, 0))
            if need is not None and need > plan.budget:
                raise MemoryBudgetError(
                    f"--max-memory {format_size(plan.budget)} would be exceeded by unit {name!r}: this process uses "
                    f"{format_size(rss_bytes() or 0)} and a unit took up to {format_size(need - (rss_bytes() or 0))} "
                    f"so far; rerun with --resume and --max-memory of at least {format_size(need)} ({need} bytes)"
                )
            self._before[name] = rss_bytes() or peak_rss_bytes()
        self.source.load(stack, names)

    def release(self, stack: Any, names: Sequence[str]) -> None:
        self.source.release(stack, names)
        peak = peak_rss_bytes()
        for name in names:
            before = self._before.pop(name, None)
            if before is not None and peak > self.plan.start_peak:  # else the peak predates the run: unknown
                self.plan.measured.append((max(0, peak - before), self.plan.module_bytes.get(name, 0)))
        self.plan.check_peak(f"{list(names)} ran")
