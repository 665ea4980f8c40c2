"""Progress of the layer-wise pipeline: a tqdm bar per phase on a terminal (ETA and resident memory),
plain lines at most every ``interval`` seconds otherwise (logs, CI), nothing when quiet."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

from .memory import format_size, rss_bytes

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, desc) as p: ... p.step(name)`` after each unit."""

    def __init__(
        self, total: int, desc: str, *, quiet: bool = False, initial: int = 0, stream: TextIO | None = None,
        interval: float = 30.0,
    ) -> None:  # fmt: skip
        self.total, self.desc, self.quiet, self.done, self.initial = total, desc, quiet, initial, initial
        self.stream = stream or sys.stderr
        self.interval, self._last, self._start = interval, 0.0, time.perf_counter()
        self._bar: Any = None
        if not quiet and self.stream.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="layer", file=self.stream, leave=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def step(self, name: str) -> None:
        self.done += 1
        rss = rss_bytes()
        memory = format_size(rss) if rss is not None else "?"
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name} rss {memory}", refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        if self.quiet or (now - self._last < self.interval and self.done < self.total):
            return
        self._last = now
        elapsed = now - self._start
        eta = elapsed / max(self.done - self.initial, 1) * (self.total - self.done)
        print(f"{self.desc}: {self.done}/{self.total} ({name}) {elapsed:.0f}s elapsed, ETA {eta:.0f}s, rss {memory}",
              file=self.stream, flush=True)  # fmt: skip
