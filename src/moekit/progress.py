"""Progress of long work, the way a serious command line reports it.

``Progress("auto")`` draws a tqdm bar when stderr is a terminal and otherwise (a pipe, a CI log)
prints one plain line at most every ``interval`` seconds, so logs stay readable (no ``\\r``).
``Progress("off")`` is silent (``--quiet``). Result lines (``echo``) go to stdout unless off.

    progress = Progress("auto")
    with progress.task(total=len(runs), desc="smear") as task:
        for run in runs:
            ...
            task.advance(note=f"{run.name} acc 0.85")
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator

__all__ = ["Progress", "Task", "PROGRESS_MODES"]

#: ``auto``: bar on a terminal, plain lines elsewhere; ``bar``, ``lines``: forced; ``off``: silent
PROGRESS_MODES = ("auto", "bar", "lines", "off")


class Task:
    """One counted piece of work; ``advance`` after each unit."""

    def __init__(self, progress: "Progress", total: int, desc: str) -> None:
        self.progress, self.total, self.desc = progress, total, desc
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar = None
        if progress.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=progress.stream, leave=False)

    def advance(self, n: int = 1, *, note: str = "") -> None:
        """Count ``n`` more units done; ``note`` describes the last one (shown beside the count)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if self.progress.mode == "lines" and (now - self._last >= self.progress.interval or self.done >= self.total):
            self._last = now
            self.progress.stream.write(self._line(now, note) + "\n")
            self.progress.stream.flush()

    def _line(self, now: float, note: str) -> str:
        elapsed = now - self._start
        line = f"{self.desc}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%), {_clock(elapsed)}"
        if 0 < self.done < self.total:
            line += f", ~{_clock(elapsed * (self.total - self.done) / self.done)} left"
        return line + (f"; {note}" if note else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Progress:
    """Where long work reports: ``echo`` for result lines, ``task`` for counted progress.

    Args:
        mode: one of ``PROGRESS_MODES``; ``"auto"`` picks ``"bar"`` on a terminal, ``"lines"`` elsewhere.
        interval: seconds between plain progress lines (``"lines"`` mode).
        stream: where bars and progress lines go (default: stderr).
    """

    def __init__(self, mode: str = "auto", *, interval: float = 30.0, stream: IO[str] | None = None) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {list(PROGRESS_MODES)}, got {mode!r}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.interval = mode, interval

    @classmethod
    def off(cls) -> "Progress":
        return cls("off")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def echo(self, message: str) -> None:
        """Print one result line to stdout (nothing when off)."""
        if self.enabled:
            print(message, flush=True)

    @contextmanager
    def task(self, total: int, desc: str) -> Iterator[Task]:
        task = Task(self, total, desc)
        try:
            yield task
        finally:
            task.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
