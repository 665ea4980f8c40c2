"""Calibration data for merging and compression (``moekit merge`` / ``moekit compress`` / ``moekit analyze``,
``moekit.evaluation``): text or token-id files -> batches.

``--calib`` takes text files, ``stdlib`` (the embedded standard-library corpus), or token-id files
that reproduce a calibration batch exactly:

* ``.safetensors`` with ``input_ids [N, S]`` (integer), optional ``attention_mask [N, S]`` (0/1) and,
  for encoder-decoder models, ``decoder_input_ids [N, S']``;
* ``.jsonl``: one JSON object per line with the same keys, each a list of ids (one row; every row
  of a file the same length -- pad and give ``attention_mask`` for ragged text).

Text becomes token windows:

* moekit language models are byte level: token = byte (``% vocab_size`` when the vocabulary has
  fewer than 256 entries).
* Hugging Face models use the tokenizer saved in the model directory when there is one; without a
  tokenizer, token id = byte ``% config.vocab_size`` (the routing statistics then come from byte
  patterns, not the model's real vocabulary -- save the tokenizer next to the model for real use).

Windows are spread evenly over the text (deterministic, no randomness).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .._checks import check_int
from ..reporting import read_utf8

__all__ = [
    "STDLIB",
    "TOKEN_SUFFIXES",
    "TOKEN_KEYS",
    "is_token_file",
    "read_calibration_bytes",
    "read_token_file",
    "token_file_batches",
    "byte_windows",
    "token_windows",
    "to_batches",
    "find_tokenizer",
]

STDLIB = "stdlib"
#: token-id file types of ``--calib`` and the tensors they may hold (``input_ids`` required)
TOKEN_SUFFIXES = (".safetensors", ".jsonl")
TOKEN_KEYS = ("input_ids", "attention_mask", "decoder_input_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def read_calibration_bytes(sources: Sequence[str], *, max_bytes: int = 2_000_000) -> bytes:
    """The concatenated bytes of ``sources``: file paths, or ``"stdlib"`` for the Python standard
    library's source files (``moekit.data.stdlib_corpus``, training split)."""
    if not sources:
        raise ValueError("--calib needs at least one text file or 'stdlib'")
    parts = []
    for source in sources:
        if source == STDLIB:
            from .stdlib_corpus import load_stdlib_corpus

            parts.append(bytes(load_stdlib_corpus(max_bytes=max_bytes).train.numpy()))
            continue
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {source!r} does not exist or is not a file")
        parts.append(path.read_bytes())
    data = b"".join(parts)
    if not data:
        raise ValueError(f"calibration text {list(sources)} is empty; give a non-empty text file or 'stdlib'")
    return data


def _starts(total: int, length: int, samples: int) -> list[int]:
    span = max(total - length, 0)
    return sorted({int(s) for s in torch.linspace(0, span, samples).round().long().tolist()})


def byte_windows(data: bytes, *, samples: int, seq_len: int, vocab_size: int) -> Tensor:
    """Up to ``samples`` windows of ``seq_len`` byte tokens (shorter text: one shorter window): ``[N, S]``."""
    check_int("samples", samples, low=1)
    check_int("seq_len", seq_len, low=1)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() % vocab_size
    S = min(seq_len, ids.numel())
    return torch.stack([ids[s : s + S] for s in _starts(ids.numel(), S, samples)])


def token_windows(data: bytes, tokenizer: Any, *, samples: int, seq_len: int) -> Tensor:
    """Up to ``samples`` windows of ``seq_len`` tokenizer ids: ``[N, S]`` (S shrinks to the shortest
    window when the text is short). Each window tokenises a byte chunk of about 8 bytes per token."""
    check_int("samples", samples, low=1)
    check_int("seq_len", seq_len, low=1)
    chunk = 8 * seq_len
    rows = []
    for s in _starts(len(data), chunk, samples):
        text = data[s : s + chunk].decode("utf-8", errors="ignore")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        if ids:
            rows.append(torch.tensor(ids, dtype=torch.long))
    if not rows:
        raise ValueError("the calibration text gives no tokens with this model's tokenizer")
    S = min(r.numel() for r in rows)
    return torch.stack([r[:S] for r in rows])


def to_batches(windows_NS: Tensor, batch_size: int) -> list[Tensor]:
    """Split ``[N, S]`` into batches of up to ``batch_size`` rows."""
    check_int("batch_size", batch_size, low=1)
    return list(windows_NS.split(batch_size))


def find_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved in a Hugging Face model directory, or None when there is none."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load the tokenizer in {str(model_dir)!r}: {str(err).splitlines()[0]}") from None


def is_token_file(source: str) -> bool:
    return source != STDLIB and Path(source).suffix.lower() in TOKEN_SUFFIXES


def _rows_from_jsonl(path: Path) -> dict[str, Tensor]:
    rows: dict[str, list[list[int]]] = {}
    for number, line in enumerate(read_utf8(path, name="--calib").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--calib {str(path)!r} line {number} is not JSON: {err.msg}") from None
        if not isinstance(obj, dict) or "input_ids" not in obj:
            raise ValueError(f"--calib {str(path)!r} line {number} must be an object with 'input_ids', got {line.strip()[:60]!r}")
        unknown = sorted(set(obj) - set(TOKEN_KEYS))
        if unknown:
            raise ValueError(f"--calib {str(path)!r} line {number} has keys {unknown}; allowed: {list(TOKEN_KEYS)}")
        for key, value in obj.items():
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"--calib {str(path)!r} line {number}: {key!r} must be a list of integers")
            rows.setdefault(key, []).append(value)
    if "input_ids" not in rows:
        raise ValueError(f"--calib {str(path)!r} holds no rows")
    out = {}
    for key, values in rows.items():
        if len(values) != len(rows["input_ids"]):
            raise ValueError(f"--calib {str(path)!r}: {key!r} is on {len(values)} lines, input_ids on {len(rows['input_ids'])}")
        lengths = sorted({len(v) for v in values})
        if len(lengths) != 1 or lengths[0] == 0:
            raise ValueError(f"--calib {str(path)!r}: every {key!r} row must have the same non-zero length (pad and "
                             f"give attention_mask), got lengths {lengths[:6]}")  # fmt: skip
        out[key] = torch.tensor(values, dtype=torch.long)
    return out


def _rows_from_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"--calib {str(path)!r} is not a readable safetensors file: {err}") from None
    unknown = sorted(set(tensors) - set(TOKEN_KEYS))
    if "input_ids" not in tensors or unknown:
        raise ValueError(f"--calib {str(path)!r} must hold 'input_ids' [N, S] (and optionally attention_mask, "
                         f"decoder_input_ids), got tensors {sorted(tensors)}")  # fmt: skip
    for key, t in tensors.items():
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool and key != "attention_mask":
            raise ValueError(f"--calib {str(path)!r}: {key!r} must be an integer tensor [N, S], got {t.dtype} {tuple(t.shape)}")
    return {k: t.long() for k, t in tensors.items()}


def read_token_file(path: str | Path, *, vocab_size: int, decoder: bool = False) -> dict[str, Tensor]:
    """The token ids of one ``.safetensors`` / ``.jsonl`` calibration file, checked: ``{key: [N, S]}``.

    ``decoder``: the model is encoder-decoder (``decoder_input_ids`` allowed; otherwise refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist or is not a file")
    rows = _rows_from_jsonl(path) if path.suffix.lower() == ".jsonl" else _rows_from_safetensors(path)
    ids = rows["input_ids"]
    if ids.numel() == 0:
        raise ValueError(f"--calib {str(path)!r}: input_ids is empty")
    mask = rows.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(f"--calib {str(path)!r}: attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"--calib {str(path)!r}: attention_mask must hold only 0 and 1")
    if "decoder_input_ids" in rows:
        if not decoder:
            raise ValueError(f"--calib {str(path)!r} has decoder_input_ids, but the model is decoder-only")
        if rows["decoder_input_ids"].shape[0] != ids.shape[0]:
            raise ValueError(f"--calib {str(path)!r}: decoder_input_ids must have as many rows as input_ids ({ids.shape[0]})")
    for key in ("input_ids", "decoder_input_ids"):
        t = rows.get(key)
        if t is not None and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"--calib {str(path)!r}: {key} must be in [0, {vocab_size}) (the model's vocabulary), "
                             f"got [{int(t.min())}, {int(t.max())}]")  # fmt: skip
    return rows


def token_file_batches(sources: Sequence[str], *, vocab_size: int, batch_size: int, decoder: bool = False) -> list[Any]:
    """Batches of the token-id files ``sources`` in order: token ids ``[B, S]`` alone, or dicts with
    the file's other tensors; one file's rows are never mixed with another's."""
    check_int("batch_size", batch_size, low=1)
    batches: list[Any] = []
    for source in sources:
        rows = read_token_file(source, vocab_size=vocab_size, decoder=decoder)
        N = rows["input_ids"].shape[0]
        for start in range(0, N, batch_size):
            part = {k: v[start : start + batch_size] for k, v in rows.items()}
            batches.append(part["input_ids"] if len(part) == 1 else part)
    return batches
