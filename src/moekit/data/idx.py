"""Reader for the IDX files of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), plain or gzipped.

IDX layout (big-endian): two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions, one uint32 size per dimension, then the data.
Corrupt or truncated files raise ``ValueError`` naming the file and what is wrong. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice

__all__ = ["read_idx", "load_mnist", "IDX_TYPES"]

#: IDX type code -> big-endian numpy dtype
IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as err:
            raise ValueError(f"{str(path)!r} is not a valid gzip file: {err}") from None
    return path.read_bytes()


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read one IDX file (``.gz`` is decompressed) into a tensor of its declared shape."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{str(path)!r} is truncated: {len(raw)} bytes, an IDX header needs at least 4")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{str(path)!r} is not an IDX file: magic number starts with {raw[:2].hex()}, expected 0000")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise ValueError(
            f"{str(path)!r} has unknown IDX type code 0x{code:02x}; known: {', '.join(f'0x{c:02x}' for c in IDX_TYPES)}"
        )
    if ndim == 0:
        raise ValueError(f"{str(path)!r} declares 0 dimensions; IDX data needs at least 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{str(path)!r} is truncated inside its header: {len(raw)} bytes, the {ndim} dimension sizes need {header}"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        kind = "truncated" if found < expected else "longer than its header says"
        raise ValueError(
            f"{str(path)!r} is {kind}: shape {shape} of {dtype.name} needs {expected} data bytes, found {found}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find(directory: Path, stem: str) -> Path:
    tried = [directory / stem, directory / f"{stem}.gz", directory / stem.replace("-idx", ".idx")]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {stem} file in {str(directory)!r}; tried {', '.join(p.name for p in tried)}")


def load_mnist(directory: str | os.PathLike[str], split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST or Fashion-MNIST (same file names) from ``directory``: uint8 images ``[N, 28, 28]`` and
    int64 labels ``[N]``. ``split`` is ``"train"`` or ``"test"``."""
    check_choice("split", split, _FILES)
    directory = Path(directory)
    image_stem, label_stem = _FILES[split]
    image_path, label_path = _find(directory, image_stem), _find(directory, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"{str(image_path)!r} must hold uint8 images [N, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dim() != 1 or labels.dtype != torch.uint8:
        raise ValueError(f"{str(label_path)!r} must hold uint8 labels [N], got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{image_path.name} has {images.shape[0]} images but {label_path.name} has {labels.shape[0]} labels"
        )
    return images, labels.long()
