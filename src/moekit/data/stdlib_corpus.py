"""An embedded byte-level text corpus: the Python standard library's own ``.py`` source files.

Every machine with Python has it, so language-model experiments need no download. Files are taken
from the stdlib directory (``sysconfig`` "stdlib", i.e. ``os.path.dirname(os.__file__)``), skipping
installed packages and test suites. Order and the train/validation split are by a hash of each file's
relative path, so they do not depend on the filesystem; the split is per file (no file is in both).
Contents differ between Python versions: ``ByteCorpus.digest`` identifies the exact text used.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._checks import check_int, check_positive

__all__ = [
    "ByteCorpus",
    "StdlibFile",
    "stdlib_root",
    "stdlib_files",
    "stdlib_split",
    "load_stdlib_corpus",
    "random_windows",
    "eval_windows",
]

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class ByteCorpus:
    """Train/validation bytes (uint8 ``[N]``), their file counts, and a SHA-256 of all the text."""

    train: Tensor
    val: Tensor
    train_files: int
    val_files: int
    digest: str
    root: str
    python: str

    def describe(self) -> dict[str, object]:
        return {
            "root": self.root, "python": self.python, "train_bytes": self.train.numel(),
            "val_bytes": self.val.numel(), "train_files": self.train_files, "val_files": self.val_files,
            "sha256": self.digest,
        }  # fmt: skip


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))


def _key(rel: str) -> int:
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:12], 16)


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Relative paths of the corpus files under ``root``, in hash order."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {str(root)!r} does not exist")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    if not rels:
        raise FileNotFoundError(f"no .py files under {str(root)!r}")
    return sorted(rels, key=lambda r: (_key(r), r))


@dataclass(frozen=True)
class StdlibFile:
    """One corpus file: its path relative to the stdlib root (the document id), its split, its bytes
    (the file's contents plus a trailing newline, as they appear in the corpus stream)."""

    path: str
    split: str
    data: bytes


def stdlib_split(
    *, max_bytes: int = 4_000_000, val_fraction: float = 0.05, root: str | os.PathLike[str] | None = None
) -> tuple[list[StdlibFile], str]:
    """The files of the corpus (whole files, in hash order, up to ``max_bytes``), each assigned to
    ``"train"`` or ``"val"``, and the SHA-256 of all their paths and text.

    Walking the files in hash order, a file goes to validation while validation holds less than
    ``val_fraction`` of the bytes read so far (so the first file always does).
    """
    check_int("max_bytes", max_bytes, low=1024)
    check_positive("val_fraction", val_fraction)
    if val_fraction >= 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    base = Path(root) if root is not None else stdlib_root()
    files: list[StdlibFile] = []
    total = val_bytes = 0
    digest = hashlib.sha256()
    for rel in stdlib_files(base):
        size = (base / rel).stat().st_size + 1
        if size == 1 or total + size > max_bytes:
            continue  # empty, or overflows the cap (a smaller later file may still fit)
        data = (base / rel).read_bytes() + b"\n"
        total += len(data)
        digest.update(rel.encode("utf-8") + b"\0" + data)
        split = "val" if val_bytes < val_fraction * total else "train"  # keeps validation at ~val_fraction
        if split == "val":
            val_bytes += len(data)
        files.append(StdlibFile(rel, split, data))
    return files, digest.hexdigest()


def load_stdlib_corpus(
    *, max_bytes: int = 4_000_000, val_fraction: float = 0.05, root: str | os.PathLike[str] | None = None
) -> ByteCorpus:
    """Read up to ``max_bytes`` of stdlib source and split it per file (``stdlib_split``)."""
    base = Path(root) if root is not None else stdlib_root()
    files, digest = stdlib_split(max_bytes=max_bytes, val_fraction=val_fraction, root=base)
    train = [f.data for f in files if f.split == "train"]
    val = [f.data for f in files if f.split == "val"]
    if not train:
        raise ValueError(f"max_bytes={max_bytes} leaves no training file; raise it")
    return ByteCorpus(
        train=_as_bytes(train), val=_as_bytes(val), train_files=len(train), val_files=len(val),
        digest=digest, root=str(base), python=sys.version.split()[0],
    )  # fmt: skip


def _as_bytes(parts: list[bytes]) -> Tensor:
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def random_windows(data_N: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` bytes: ``[B, S+1]`` int64 (inputs + targets)."""
    if data_N.numel() <= seq_len + 1:
        raise ValueError(f"corpus has {data_N.numel()} bytes, too few for seq_len={seq_len}")
    starts = torch.randint(0, data_N.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data_N[s : s + seq_len + 1] for s in starts.tolist()]).long()


def eval_windows(data_N: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """Up to ``max_windows`` non-overlapping windows spread evenly over ``data_N``: ``[N, S+1]`` int64."""
    count = min(max_windows, data_N.numel() // (seq_len + 1))
    if count < 1:
        raise ValueError(f"corpus has {data_N.numel()} bytes, too few for seq_len={seq_len}")
    span = data_N.numel() - seq_len - 1
    starts = torch.linspace(0, span, count).long() if count > 1 else torch.zeros(1, dtype=torch.long)
    starts = (starts // (seq_len + 1)) * (seq_len + 1)  # snap to a grid: windows never overlap
    starts = torch.unique(starts)
    return torch.stack([data_N[s : s + seq_len + 1] for s in starts.tolist()]).long()
