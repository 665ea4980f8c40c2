"""Evaluation documents: the held-out stdlib files, or text / token-id files a user gives.

* ``"stdlib"``: the validation files of ``moekit.data.stdlib_corpus`` (split per file, by a hash of
  the path). Calibration and training use the train files, so these are held out; the JSON records
  the ids of both sides (``describe()``), so disjointness can be checked afterwards.
* a text file: one document (its bytes); ``.jsonl`` with a ``"text"`` field: one document per line.
* token ids: ``.jsonl`` with ``"input_ids"`` (one document per line, optional ``"attention_mask"``),
  or ``.safetensors`` with ``input_ids`` ``[N, S]`` (optional ``attention_mask`` ``[N, S]``): one
  document per row, made of the tokens the mask marks (they must be contiguous).

A document's id is the stdlib-relative path, the file path, or ``path:line`` / ``path:row``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np

from ..reporting import read_utf8

__all__ = ["Document", "EvalData", "STDLIB", "stdlib_heldout", "load_files", "load_data", "round_robin", "char_start"]

STDLIB = "stdlib"
TOKEN_SUFFIXES = (".safetensors",)
T = TypeVar("T")


@dataclass(frozen=True)
class Document:
    """One evaluation unit: text (UTF-8 bytes) or, for token-id files, token ids."""

    id: str
    text: bytes | None = None
    tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.tokens is None):
            raise ValueError(f"document {self.id!r} needs exactly one of text and tokens")

    def __len__(self) -> int:
        return len(self.text) if self.text is not None else len(self.tokens or ())


@dataclass(frozen=True)
class EvalData:
    """The documents of one evaluation and where they came from (``source``: JSON-ready)."""

    documents: tuple[Document, ...]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.documents:
            raise ValueError(f"no evaluation documents in {self.source.get('name', 'the data')}")
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            raise ValueError("evaluation document ids must be unique")

    @property
    def has_text(self) -> bool:
        return all(d.text is not None for d in self.documents)

    @property
    def digest(self) -> str:
        """SHA-256 of every document's id and content (identifies the exact data evaluated)."""
        h = hashlib.sha256()
        for d in self.documents:
            body = d.text if d.text is not None else json.dumps(list(d.tokens or ())).encode()
            h.update(d.id.encode("utf-8") + b"\0" + body + b"\0")
        return h.hexdigest()

    def head(self, count: int | None) -> "EvalData":
        """The first ``count`` documents (all when None)."""
        if count is None or count >= len(self.documents):
            return self
        if count < 1:
            raise ValueError(f"documents must be >= 1, got {count}")
        return EvalData(self.documents[:count], {**self.source, "documents_limit": count})

    def describe(self) -> dict[str, Any]:
        docs = [
            {"id": d.id, "bytes": len(d.text) if d.text is not None else None,
             "tokens": len(d.tokens) if d.tokens is not None else None}
            for d in self.documents
        ]  # fmt: skip
        return {**self.source, "sha256": self.digest, "documents": docs}


def stdlib_heldout(
    *, max_bytes: int = 4_000_000, val_fraction: float = 0.05, root: str | os.PathLike[str] | None = None
) -> EvalData:
    """The validation files of the stdlib corpus (``moekit.data.stdlib_corpus.stdlib_split`` with the
    same arguments as the training / calibration corpus, by default those of the experiments)."""
    from ..data.stdlib_corpus import stdlib_root, stdlib_split

    base = Path(root) if root is not None else stdlib_root()
    files, digest = stdlib_split(max_bytes=max_bytes, val_fraction=val_fraction, root=base)
    source = {
        "name": STDLIB, "root": str(base), "corpus_sha256": digest,
        "split": {
            "rule": "moekit.data.stdlib_corpus.stdlib_split: per file, in hash order of the path",
            "max_bytes": max_bytes, "val_fraction": val_fraction, "evaluated": "val",
            "train_documents": [f.path for f in files if f.split == "train"],
        },
    }  # fmt: skip
    return EvalData(tuple(Document(f.path, text=f.data) for f in files if f.split == "val"), source)


def _token_rows(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]] | None, where: str) -> list[tuple[int, ...]]:
    rows = []
    for i, row in enumerate(ids):
        row = [int(t) for t in row]
        if masks is not None:
            mask = [int(m) for m in masks[i]]
            if len(mask) != len(row) or any(m not in (0, 1) for m in mask):
                raise ValueError(f"{where} row {i}: attention_mask must be 0/1 with the length of input_ids")
            kept = [j for j, m in enumerate(mask) if m]
            if kept and kept[-1] - kept[0] + 1 != len(kept):
                raise ValueError(f"{where} row {i}: attention_mask must mark one contiguous run of tokens")
            row = [row[j] for j in kept]
        rows.append(tuple(row))
    return rows


def _safetensors_documents(path: Path) -> list[Document]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read token-id file {str(path)!r}: {err}") from None
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"{str(path)!r} must hold an integer tensor input_ids [N, S]; it holds {sorted(tensors)}")
    mask = tensors.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"{str(path)!r}: attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
    rows = _token_rows(ids.tolist(), mask.tolist() if mask is not None else None, repr(str(path)))
    return [Document(f"{path}:{i}", tokens=row) for i, row in enumerate(rows) if row]


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not JSON: {err}") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            if record["text"]:
                docs.append(Document(f"{path}:{n}", text=record["text"].encode("utf-8")))
        elif isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            mask = record.get("attention_mask")
            row = _token_rows([record["input_ids"]], [mask] if mask is not None else None, where)[0]
            if row:
                docs.append(Document(f"{path}:{n}", tokens=row))
        else:
            raise ValueError(f"{where} needs a string 'text' or a list 'input_ids'")
    return docs


def load_files(paths: Sequence[str | os.PathLike[str]]) -> EvalData:
    """Documents from text, ``.jsonl`` and ``.safetensors`` files (see the module docstring)."""
    if not paths:
        raise ValueError("give at least one data file (or 'stdlib')")
    docs: list[Document] = []
    files = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(p)!r} does not exist or is not a file")
        if path.suffix in TOKEN_SUFFIXES:
            found = _safetensors_documents(path)
        elif path.suffix == ".jsonl":
            found = _jsonl_documents(path)
        else:
            text = path.read_bytes()
            found = [Document(str(path), text=text)] if text else []
        if not found:
            raise ValueError(f"data file {str(p)!r} holds no document (it is empty)")
        docs += found
        files.append(str(path))
    return EvalData(tuple(docs), {"name": "files", "files": files})


def load_data(spec: str | Sequence[str | os.PathLike[str]] | EvalData, **stdlib_kwargs: Any) -> EvalData:
    """``"stdlib"`` (held-out stdlib files), a list of file paths, or ``EvalData`` as it is."""
    if isinstance(spec, EvalData):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    specs = [str(s) for s in spec]
    if STDLIB in specs:
        if len(specs) > 1:
            raise ValueError(f"--data 'stdlib' cannot be combined with files, got {specs}")
        return stdlib_heldout(**stdlib_kwargs)
    return load_files(specs)


def char_start(text: bytes, i: int) -> int:
    """The first index >= i that starts a UTF-8 character (so a cut never splits one)."""
    while i < len(text) and (text[i] & 0xC0) == 0x80:
        i += 1
    return i


def round_robin(groups: Sequence[Sequence[T]], rng: np.random.Generator) -> Iterator[T]:
    """Every element of ``groups`` (one group per document), taking the groups in turn: each round
    visits the non-empty groups in a fresh random order and takes a random unused element of each, so
    any prefix of the stream spreads over documents. Deterministic for a given ``rng`` state."""
    queues = [[g[i] for i in rng.permutation(len(g)).tolist()] for g in groups]
    while any(queues):
        for d in rng.permutation(len(queues)).tolist():
            if queues[d]:
                yield queues[d].pop()
