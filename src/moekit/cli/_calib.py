"""Calibration text for ``moekit merge``: text files (or the embedded stdlib corpus) -> token batches.

* moekit language models are byte level: token = byte (``% vocab_size`` when the vocabulary has
  fewer than 256 entries).
* Hugging Face models use the tokenizer saved in the model directory when there is one; without a
  tokenizer, token id = byte ``% config.vocab_size`` (the routing statistics then come from byte
  patterns, not the model's real vocabulary -- save the tokenizer next to the model for real use).

Windows are spread evenly over the text (deterministic, no randomness).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch loads when calibration runs, not for moekit --help
    from torch import Tensor

__all__ = ["STDLIB", "read_calibration_bytes", "byte_windows", "token_windows", "to_batches", "find_tokenizer"]

STDLIB = "stdlib"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def read_calibration_bytes(sources: Sequence[str], *, max_bytes: int = 2_000_000) -> bytes:
    """The concatenated bytes of ``sources``: file paths, or ``"stdlib"`` for the Python standard
    library's source files (``moekit.data.stdlib_corpus``, training split)."""
    if not sources:
        raise ValueError("--calib needs at least one text file or 'stdlib'")
    parts = []
    for source in sources:
        if source == STDLIB:
            from ..data.stdlib_corpus import load_stdlib_corpus

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
    import torch

    span = max(total - length, 0)
    return sorted({int(s) for s in torch.linspace(0, span, samples).round().long().tolist()})


def byte_windows(data: bytes, *, samples: int, seq_len: int, vocab_size: int) -> Tensor:
    """Up to ``samples`` windows of ``seq_len`` byte tokens (shorter text: one shorter window): ``[N, S]``."""
    import torch

    from .._checks import check_int

    check_int("samples", samples, low=1)
    check_int("seq_len", seq_len, low=1)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() % vocab_size
    S = min(seq_len, ids.numel())
    return torch.stack([ids[s : s + S] for s in _starts(ids.numel(), S, samples)])


def token_windows(data: bytes, tokenizer: Any, *, samples: int, seq_len: int) -> Tensor:
    """Up to ``samples`` windows of ``seq_len`` tokenizer ids: ``[N, S]`` (S shrinks to the shortest
    window when the text is short). Each window tokenises a byte chunk of about 8 bytes per token."""
    import torch

    from .._checks import check_int

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
    from .._checks import check_int

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
