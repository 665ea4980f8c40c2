"""Process memory: sizes like ``"2GB"``, resident memory now and at its peak, memory still free.

Linux ``/proc`` is the source (``VmRSS``/``VmHWM`` of ``/proc/self/status``, ``MemAvailable`` of
``/proc/meminfo``); elsewhere ``resource.getrusage`` gives the peak and the current value is unknown.
"""

from __future__ import annotations

import ctypes
import re
import resource
import sys
from pathlib import Path

__all__ = ["parse_size", "format_size", "rss_bytes", "peak_rss_bytes", "available_bytes", "release_memory"]

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``"2GB"``, ``"1.5 GiB"``, ``"800M"``, ``"123456"`` (decimal units, ``i`` = binary)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"size must look like 2GB, 1.5GiB, 800MB or a byte count, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be > 0 bytes, got {text!r}")
    return value


def format_size(num_bytes: float) -> str:
    """``1234567890`` -> ``"1.23 GB"``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def _status_kb(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int | None:
    """Resident memory of this process now (None where ``/proc`` is missing)."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def available_bytes() -> int | None:
    """Memory the kernel could give this process without swapping (``MemAvailable``), or None."""
    return _status_kb("MemAvailable", "/proc/meminfo")


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that resident memory follows
    what is live rather than what was ever allocated (tensors themselves are freed by refcount; a full
    ``gc.collect`` costs half a second with transformers loaded and frees nothing here)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
