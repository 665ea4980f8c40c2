"""The calibration options of ``moekit merge`` / ``moekit compress`` (``--calib`` and friends); the data
itself is read by ``moekit.data.calibration`` and batched by ``moekit.merging.inputs``."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ._options import at_least

#: read from ``moekit.data.calibration`` on first use (it imports torch; ``moekit --help`` must not)
_DATA_NAMES = frozenset({"STDLIB", "byte_windows", "find_tokenizer", "is_token_file", "read_calibration_bytes",
                         "to_batches", "token_file_batches", "token_windows"})  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _DATA_NAMES:
        from ..data import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["add_calib_options", "calib_inputs", "calibration_batches"]


def add_calib_options(parser: argparse.ArgumentParser) -> None:
    """``--calib``, ``--calib-samples``, ``--seq-len``, ``--batch-size`` (shared by merge and compress)."""
    from ..data.calibration import STDLIB

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
    parser.add_argument("--calib-weights", type=_weights, default=None, metavar="W,W,...",
                        help="one weight per --calib source: each source is read on its own (text: --calib-samples "
                        "windows each) and contributes its weight's share of every statistic, whatever its size "
                        "(default: the sources are pooled)")  # fmt: skip


def _weights(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers > 0, got {text!r}") from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers > 0, got {text!r}")
    return values


def calib_inputs(sources: Sequence[str]) -> list[str]:
    """The ``--calib`` entries that are files (the inputs an output directory must not overlap)."""
    from ..data.calibration import STDLIB

    return [s for s in sources if s != STDLIB]


def calibration_batches(args: argparse.Namespace, **model: Any) -> tuple[list[Any], dict[str, Any]]:
    """The batches of ``--calib`` (with ``--calib-samples``, ``--seq-len``, ``--batch-size``, ``--calib-weights``)
    for the model described by ``model`` (``vocab_size``, ``context``, ...): ``moekit.merging.inputs.calibration_batches``."""
    from ..merging.inputs import calibration_batches as batches

    return batches(args.calib, samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                   weights=getattr(args, "calib_weights", None), **model)  # fmt: skip
