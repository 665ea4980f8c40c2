"""safetensors files for streamed compression: atomic writes, sizes from headers, joining files.

Every file is written under a temporary name beside its target and renamed, so a run killed at any
point leaves either the old file or the whole new one.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

__all__ = ["save_tensors", "tensor_sizes", "concat_safetensors"]

_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


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
