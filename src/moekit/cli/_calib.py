"""The calibration options of ``moekit merge`` / ``moekit compress`` (``--calib`` and friends); the data
itself is read by ``moekit.data.calibration``."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..data.calibration import (
    STDLIB,
    byte_windows,
    find_tokenizer,
    is_token_file,
    read_calibration_bytes,
    to_batches,
    token_file_batches,
    token_windows,
)
from ._options import at_least

__all__ = [
    "STDLIB", "add_calib_options", "calib_inputs", "calibration_batches", "byte_windows", "find_tokenizer", "is_token_file",
    "read_calibration_bytes", "to_batches", "token_file_batches", "token_windows",
]


def add_calib_options(parser: argparse.ArgumentParser) -> None:
    """``--calib``, ``--calib-samples``, ``--seq-len``, ``--batch-size`` (shared by merge and compress)."""
    parser.add_argument(
        "--calib", nargs="+", default=[STDLIB], metavar="SOURCE",
        help="calibration text file(s), 'stdlib' for the Python standard library sources, or token-id files "
        "(.safetensors / .jsonl with input_ids [N, S], optional attention_mask, decoder_input_ids)",
    )  # fmt: skip
    parser.add_argument("--calib-samples", type=at_least(1), default=64,
                        help="calibration sequences cut from text (token-id files: all their rows)")  # fmt: skip
    parser.add_argument("--seq-len", type=at_least(1), default=128,
                        help="tokens per calibration sequence cut from text")  # fmt: skip
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="calibration batch size")


def calib_inputs(sources: Sequence[str]) -> list[str]:
    """The ``--calib`` entries that are files (the inputs an output directory must not overlap)."""
    return [s for s in sources if s != STDLIB]


def calibration_batches(
    args: argparse.Namespace, *, vocab_size: int, context: int | None, tokenizer: Any = None,
    decoder: bool = False, byte_level: bool = False,
) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The batches of ``--calib`` (with ``--calib-samples``, ``--seq-len``, ``--batch-size``) and what
    they are (``sources``, ``rows``, ``tokens``, ``tokenizer``). Text: windows of the ``tokenizer``'s ids,
    else of bytes (``% vocab_size``; ``byte_level``: the model's own tokens are bytes); token-id files:
    their rows as they are."""
    sources = list(args.calib)
    files = [s for s in sources if is_token_file(s)]
    if files:
        if len(files) != len(sources):
            raise ValueError("--calib takes either text (files or 'stdlib') or token-id files (.safetensors/.jsonl), not both")
        batches = token_file_batches(files, vocab_size=vocab_size, batch_size=args.batch_size, decoder=decoder)
        ids = [b["input_ids"] if isinstance(b, dict) else b for b in batches]
        return batches, {"sources": sources, "rows": sum(int(t.shape[0]) for t in ids),
                         "tokens": sum(t.numel() for t in ids), "tokenizer": "token-id files"}  # fmt: skip
    data = read_calibration_bytes(sources)
    seq_len = min(args.seq_len, context or args.seq_len)
    if tokenizer is not None:
        windows = token_windows(data, tokenizer, samples=args.calib_samples, seq_len=seq_len)
        tokens = "model"
    else:
        windows = byte_windows(data, samples=args.calib_samples, seq_len=seq_len, vocab_size=vocab_size)
        tokens = "bytes" if byte_level else "bytes % vocab_size"
    info = {"sources": sources, "rows": int(windows.shape[0]), "tokens": windows.numel(), "tokenizer": tokens}
    return to_batches(windows, args.batch_size), info
