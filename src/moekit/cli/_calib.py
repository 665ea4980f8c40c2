"""The calibration options of ``moekit merge`` / ``moekit compress`` (``--calib`` and friends); the data
itself is read by ``moekit.data.calibration``."""

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


def calibration_batches(
    args: argparse.Namespace, *, vocab_size: int, context: int | None, tokenizer: Any = None,
    decoder: bool = False, byte_level: bool = False,
) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The batches of ``--calib`` (with ``--calib-samples``, ``--seq-len``, ``--batch-size``) and what
    they are (``sources``, ``rows``, ``tokens``, ``tokenizer``). Text: windows of the ``tokenizer``'s ids,
    else of bytes (``% vocab_size``; ``byte_level``: the model's own tokens are bytes); token-id files:
    their rows as they are. With ``--calib-weights`` every source gives its own batches, mixed with
    ``moekit.merging.observer.mix_calibration``."""
    from ..data.calibration import (
        byte_windows, is_token_file, read_calibration_bytes, to_batches, token_file_batches, token_windows,
    )  # fmt: skip

    sources = list(args.calib)
    weights = getattr(args, "calib_weights", None)
    if weights is not None:
        return _weighted_batches(args, sources, weights, vocab_size=vocab_size, context=context, tokenizer=tokenizer,
                                 decoder=decoder, byte_level=byte_level)  # fmt: skip
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


def _weighted_batches(args: argparse.Namespace, sources: list[str], weights: Sequence[float],
                      **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    from ..merging.observer import mix_calibration

    if len(weights) != len(sources):
        raise ValueError(f"--calib-weights needs one weight per --calib source ({len(sources)}), got {len(weights)}")
    parts, infos = [], []
    for source, weight in zip(sources, weights):
        one = argparse.Namespace(**{**vars(args), "calib": [source], "calib_weights": None})
        batches, info = calibration_batches(one, **kwargs)
        parts.append((batches, weight))
        infos.append(info)
    info = {"sources": sources, "weights": list(weights), "rows": sum(i["rows"] for i in infos),
            "tokens": sum(i["tokens"] for i in infos), "tokenizer": infos[0]["tokenizer"]}  # fmt: skip
    return mix_calibration(parts), info
