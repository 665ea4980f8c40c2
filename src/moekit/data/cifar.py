"""CIFAR-10 / CIFAR-100 in the *binary* format (https://www.cs.toronto.edu/~kriz/cifar.html), from
files the user has on disk. The Python "pickle" version is never read (unpickling runs code).

Records: CIFAR-10 = 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major
32x32); CIFAR-100 = 1 coarse-label byte + 1 fine-label byte + 3072 pixel bytes. Files:
``cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin`` and ``cifar-100-binary/train.bin,
test.bin``. A truncated or corrupt file raises ``ValueError`` naming it and what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice
from .images import ImageSplit, standardise_images

__all__ = ["CifarFiles", "CIFAR", "read_cifar_file", "load_cifar", "load_cifar_split"]

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarFiles:
    """Layout of one CIFAR variant: sub-directory, files per split, label bytes, classes, name files."""

    subdir: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int
    num_classes: int
    num_coarse: int
    names_file: str


CIFAR = {
    "cifar10": CifarFiles(
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        1,
        10,
        0,
        "batches.meta.txt",
    ),
    "cifar100": CifarFiles("cifar-100-binary", ("train.bin",), ("test.bin",), 2, 100, 20, "fine_label_names.txt"),
}


def read_cifar_file(path: str | os.PathLike[str], dataset: str = "cifar10") -> tuple[Tensor, Tensor, Tensor | None]:
    """One binary file: uint8 images ``[N, 3, 32, 32]``, int64 labels ``[N]`` (fine labels for
    CIFAR-100) and, for CIFAR-100, coarse labels ``[N]`` (else None)."""
    spec = CIFAR[check_choice("dataset", dataset, CIFAR)]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {str(path)!r} does not exist")
    raw = np.fromfile(path, dtype=np.uint8)
    record = spec.label_bytes + PIXELS
    if raw.size == 0:
        raise ValueError(f"CIFAR file {str(path)!r} is empty")
    if raw.size % record:
        raise ValueError(
            f"CIFAR file {str(path)!r} is truncated or not {dataset} binary: {raw.size} bytes is not a multiple of the "
            f"{record}-byte record ({raw.size // record} whole records, then {raw.size % record} bytes)"
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, spec.label_bytes - 1].astype(np.int64)
    _check_range(path, labels, spec.num_classes, "label" if dataset == "cifar10" else "fine label")
    coarse = None
    if spec.label_bytes == 2:
        coarse_np = rows[:, 0].astype(np.int64)
        _check_range(path, coarse_np, spec.num_coarse, "coarse label")
        coarse = torch.from_numpy(coarse_np)
    images = torch.from_numpy(np.ascontiguousarray(rows[:, spec.label_bytes :]).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels), coarse


def _check_range(path: Path, labels: np.ndarray, num: int, what: str) -> None:
    bad = np.flatnonzero(labels >= num)
    if bad.size:
        raise ValueError(
            f"CIFAR file {str(path)!r} is corrupt: record {int(bad[0])} has {what} {int(labels[bad[0]])}, "
            f"allowed 0..{num - 1} ({bad.size} bad records)"
        )


def _directory(directory: Path, spec: CifarFiles) -> Path:
    for candidate in (directory, directory / spec.subdir):
        if (candidate / spec.test[0]).is_file() or (candidate / spec.train[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR binary files in {str(directory)!r} or {str(directory / spec.subdir)!r}; expected "
        f"{', '.join(spec.train + spec.test)} (the binary version, not the python/pickle one)"
    )


def load_cifar(
    directory: str | os.PathLike[str], dataset: str = "cifar10", split: str = "train"
) -> tuple[Tensor, Tensor, Tensor | None]:
    """All files of ``split`` (``"train"``/``"test"``) concatenated: images, labels, coarse labels or None."""
    spec = CIFAR[check_choice("dataset", dataset, CIFAR)]
    root = _directory(Path(directory), spec)
    files = getattr(spec, check_choice("split", split, ("train", "test")))
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} lacks CIFAR files {missing} of the {split} split")
    parts = [read_cifar_file(root / f, dataset) for f in files]
    coarse = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None  # type: ignore[misc]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), coarse


def _class_names(root: Path, spec: CifarFiles) -> tuple[str, ...]:
    path = root / spec.names_file
    if not path.is_file():
        return ()
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return tuple(names) if len(names) == spec.num_classes else ()


def load_cifar_split(
    directory: str | os.PathLike[str],
    dataset: str = "cifar10",
    *,
    num_train: int | None = None,
    num_test: int | None = None,
) -> ImageSplit:
    """CIFAR as an ``ImageSplit`` (standardised per channel); CIFAR-100 adds ``meta["superclass"]``.
    ``num_train`` / ``num_test`` keep the first images of each split."""
    spec = CIFAR[check_choice("dataset", dataset, CIFAR)]
    x_tr, y_tr, c_tr = load_cifar(directory, dataset, "train")
    x_te, y_te, c_te = load_cifar(directory, dataset, "test")
    xs_tr, xs_te = standardise_images(x_tr[:num_train], x_te[:num_test])
    meta_tr = {"superclass": c_tr[:num_train]} if c_tr is not None else {}
    meta_te = {"superclass": c_te[:num_test]} if c_te is not None else {}
    names = _class_names(_directory(Path(directory), spec), spec)
    return ImageSplit(
        xs_tr, y_tr[:num_train], xs_te, y_te[:num_test], spec.num_classes, dataset, meta_tr, meta_te, names
    )
