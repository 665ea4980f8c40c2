"""The calibration options of ``moekit merge`` / ``moekit compress`` (``--calib`` and friends); the data
itself is read by ``moekit.data.calibration``."""

from __future__ import annotations

import argparse
from typing import Sequence

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
    "STDLIB", "add_calib_options", "calib_inputs", "byte_windows", "find_tokenizer", "is_token_file",
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
