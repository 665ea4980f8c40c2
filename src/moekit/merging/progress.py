"""Progress of the layer-wise pipeline: ``moekit.progress`` (a bar with ETA on a terminal, plain lines at
most every ``interval`` seconds in a log, nothing when quiet), one task per phase, each step noting the
unit just finished and the process's resident memory."""

from __future__ import annotations

from typing import Any, TextIO

from ..progress import Progress as _Progress
from .memory import format_size, rss_bytes

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, desc) as p: ... p.step(name)`` after each unit; a resumed run
    (``initial`` units already done) counts the remaining ones."""

    def __init__(
        self, total: int, desc: str, *, quiet: bool = False, initial: int = 0, stream: TextIO | None = None,
        interval: float = 30.0,
    ) -> None:  # fmt: skip
        self._progress = _Progress("off" if quiet else "auto", interval=interval, stream=stream)
        label = desc if not initial else f"{desc} (resumed after {initial}/{total})"
        self._context = self._progress.task(total=total - initial, desc=label)
        self._task: Any = None

    def __enter__(self) -> "Progress":
        self._task = self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)

    def step(self, name: str) -> None:
        rss = rss_bytes()
        self._task.advance(note=f"{name}, rss {format_size(rss) if rss is not None else '?'}")
