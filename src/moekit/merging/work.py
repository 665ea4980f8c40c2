"""Where the layer-wise pipeline keeps what flows between units.

* hidden states, one value per calibration batch, per stage (the inputs of one unit);
* the statistics of each unit's blocks (between the observation pass and compression);
* its progress (which phase and unit come next), so that an interrupted run can resume.

``MemoryWork`` keeps everything in memory (in-memory models). ``DiskWork``
(``moekit.merging.resume``) writes it under a run directory, one file per batch, each written to a
temporary name and renamed, so a run killed at any point leaves only complete files.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["HiddenStore", "MemoryHidden", "Work", "MemoryWork"]

BlockStats = dict[str, dict[str, dict[str, Tensor]]]


class HiddenStore:
    """One value per calibration batch (``put(b, value)`` / ``get(b)``)."""

    def put(self, batch: int, value: Any) -> None:
        raise NotImplementedError

    def get(self, batch: int) -> Any:
        raise NotImplementedError


class MemoryHidden(HiddenStore):
    def __init__(self) -> None:
        self.values: dict[int, Any] = {}

    def put(self, batch: int, value: Any) -> None:
        self.values[batch] = value

    def get(self, batch: int) -> Any:
        return self.values[batch]


class Work:
    """Storage of one pipeline run (see module docstring)."""

    def hidden(self, stage: str) -> HiddenStore:
        """The store of ``stage`` (created empty if new)."""
        raise NotImplementedError

    def has_hidden(self, stage: str) -> bool:
        raise NotImplementedError

    def drop_hidden(self, stage: str) -> None:
        raise NotImplementedError

    def save_stats(self, unit: int, stats: BlockStats) -> None:
        raise NotImplementedError

    def load_stats(self, unit: int) -> BlockStats:
        raise NotImplementedError

    def state(self) -> dict[str, Any] | None:
        """The saved progress, or None for a new run."""
        return None

    def save_state(self, state: dict[str, Any]) -> None:
        """Record progress (after everything it refers to is stored)."""


class MemoryWork(Work):
    """Everything in memory; nothing survives the process (no resume)."""

    def __init__(self) -> None:
        self._hidden: dict[str, MemoryHidden] = {}
        self._stats: dict[int, BlockStats] = {}

    def hidden(self, stage: str) -> HiddenStore:
        return self._hidden.setdefault(stage, MemoryHidden())

    def has_hidden(self, stage: str) -> bool:
        return stage in self._hidden

    def drop_hidden(self, stage: str) -> None:
        self._hidden.pop(stage, None)

    def save_stats(self, unit: int, stats: BlockStats) -> None:
        self._stats[unit] = stats

    def load_stats(self, unit: int) -> BlockStats:
        return self._stats[unit]
