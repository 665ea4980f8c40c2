"""safetensors files for streamed compression: reading tensors, atomic writes, sizes from headers,
joining files.

``read_tensors`` reads tensors with ``readinto`` into freshly allocated tensors at the offsets the
header gives, not through a memory map (``safe_open``): mapped file pages that were touched count in
the process's resident memory until the map is closed, so a memory bound would pay twice for every
tensor read. Every file is written under a temporary name beside its target and renamed, so a run
killed at any point leaves either the old file or the whole new one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["read_tensors", "save_tensors", "tensor_sizes", "concat_safetensors"]

#: safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip


def read_tensors(path: Path, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The tensors ``keys`` (default: all, in file order) of the safetensors file ``path``, each read
    into its own new CPU tensor (no memory map; see the module docstring). ValueError names the file
    and the tensor when a name is missing, a dtype unknown, or the file shorter than its header says."""
    size, header = _header(path)
    names = [k for k in header if k != "__metadata__"] if keys is None else list(keys)
    out: dict[str, Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for name in names:
            info = header.get(name) if name != "__metadata__" else None
            if info is None:
                raise ValueError(f"safetensors file {str(path)!r} has no tensor {name!r}")
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} of {str(path)!r} has dtype {info['dtype']!r}; readable: {sorted(DTYPES)}")
            start, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
            numel = math.prod(shape)
            if end - start != numel * dtype.itemsize:
                raise ValueError(f"tensor {name!r} of {str(path)!r}: shape {shape} of {info['dtype']} needs "
                                 f"{numel * dtype.itemsize} bytes, its offsets give {end - start}")  # fmt: skip
            raw = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + size + start)
            view, done = memoryview(raw.numpy()), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"safetensors file {str(path)!r} is truncated: tensor {name!r} needs bytes "
                                     f"{8 + size + start}-{8 + size + end}, the file has {os.path.getsize(path)}")  # fmt: skip
                done += got
            out[name] = raw.view(dtype).reshape(shape)
    return out


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` to ``path`` through a temporary file and a rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return size, json.loads(f.read(size))


def tensor_sizes(path: Path) -> dict[str, int]:
    """``{tensor name: bytes}`` of one safetensors file, from its header."""
    _, header = _header(path)
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            out[name] = end - start
    return out


def concat_safetensors(paths: Sequence[Path], out: Path, *, chunk: int = 1 << 24) -> None:
    """One safetensors file holding every tensor of ``paths`` (distinct names), written by copying
    each tensor's bytes in ``chunk``-sized pieces (memory stays at one chunk)."""
    entries, offset = [], 0
    for path in paths:
        size, header = _header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            entries.append((name, info, path, 8 + size + start, end - start, offset))
            offset += end - start
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names repeat across {[str(p) for p in paths]}")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, info, _, _, length, at in entries:
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [at, at + length]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)) + text)
        for _, _, path, start, length, _ in entries:
            with open(path, "rb") as src:
                src.seek(start)
                left = length
                while left:
                    piece = src.read(min(chunk, left))
                    dst.write(piece)
                    left -= len(piece)
    os.replace(tmp, out)
