"""What a compression run reads besides its spec: the description of the input checkpoint
(``checkpoint_info``) and the calibration batches of its sources (``calibration_batches``). Shared by
``moekit merge`` / ``moekit compress`` (whose options ``cli/_calib.py`` parses) and by
``moekit reproduce compression --model`` (``experiments/compression_model.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

__all__ = ["checkpoint_info", "calibration_batches"]


def checkpoint_info(src: Path) -> SimpleNamespace:
    """What a run needs to know about the input ``src`` (a Hugging Face model directory or moekit checkpoint)
    before it starts: ``kind``, its MoE blocks' expert ``counts``, ``vocab``, ``context`` length,
    ``tokenizer`` (or None) and whether it is encoder-decoder (``decoder``)."""
    from ..data.calibration import find_tokenizer
    from .streaming import open_checkpoint

    if src.exists() and not src.is_dir():
        raise ValueError(f"input {str(src)!r} is not a directory (give a Hugging Face model directory or moekit checkpoint)")
    opened = open_checkpoint(src)
    stack = opened.stack
    counts = {name: stack.adapter.num_experts(b) for name, b in stack.adapter.blocks(stack.model).items()}
    if opened.kind == "moekit":
        cfg = opened.meta.get("config", {})
        if "vocab_size" not in cfg or "max_seq_len" not in cfg:
            raise ValueError(f"{str(src)!r} holds a {opened.meta.get('model')!r} model; calibration needs a language model")
        return SimpleNamespace(kind="moekit", counts=counts, vocab=cfg["vocab_size"], context=cfg["max_seq_len"],
                               tokenizer=None, decoder=False)  # fmt: skip
    config = stack.config.get_text_config() if hasattr(stack.config, "get_text_config") else stack.config
    return SimpleNamespace(
        kind="huggingface", counts=counts, vocab=int(config.vocab_size),
        context=getattr(config, "max_position_embeddings", None), tokenizer=find_tokenizer(src),
        decoder=bool(getattr(stack.config, "is_encoder_decoder", False)),
    )  # fmt: skip


def calibration_batches(
    sources: Sequence[str], *, samples: int, seq_len: int, batch_size: int, weights: Sequence[float] | None = None,
    vocab_size: int, context: int | None, tokenizer: Any = None, decoder: bool = False, byte_level: bool = False,
) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The batches of the calibration ``sources`` (``--calib``: text files, ``"stdlib"``, or token-id files) and
    what they are (``sources``, ``rows``, ``tokens``, ``tokenizer``). Text: ``samples`` windows of ``seq_len``
    of the ``tokenizer``'s ids, else of bytes (``% vocab_size``; ``byte_level``: the model's own tokens are
    bytes); token-id files: their rows as they are; ``batch_size`` rows per batch. With ``weights``
    (``--calib-weights``) every source gives its own batches, mixed with
    ``moekit.merging.observer.mix_calibration``."""
    from ..data.calibration import (
        byte_windows, is_token_file, read_calibration_bytes, to_batches, token_file_batches, token_windows,
    )  # fmt: skip

    sources = list(sources)
    if weights is not None:
        return _weighted_batches(sources, weights, samples=samples, seq_len=seq_len, batch_size=batch_size,
                                 vocab_size=vocab_size, context=context, tokenizer=tokenizer, decoder=decoder,
                                 byte_level=byte_level)  # fmt: skip
    files = [s for s in sources if is_token_file(s)]
    if files:
        if len(files) != len(sources):
            raise ValueError("--calib takes either text (files or 'stdlib') or token-id files (.safetensors/.jsonl), not both")
        batches = token_file_batches(files, vocab_size=vocab_size, batch_size=batch_size, decoder=decoder)
        ids = [b["input_ids"] if isinstance(b, dict) else b for b in batches]
        return batches, {"sources": sources, "rows": sum(int(t.shape[0]) for t in ids),
                         "tokens": sum(t.numel() for t in ids), "tokenizer": "token-id files"}  # fmt: skip
    data = read_calibration_bytes(sources)
    seq_len = min(seq_len, context or seq_len)
    if tokenizer is not None:
        windows = token_windows(data, tokenizer, samples=samples, seq_len=seq_len)
        tokens = "model"
    else:
        windows = byte_windows(data, samples=samples, seq_len=seq_len, vocab_size=vocab_size)
        tokens = "bytes" if byte_level else "bytes % vocab_size"
    info = {"sources": sources, "rows": int(windows.shape[0]), "tokens": windows.numel(), "tokenizer": tokens}
    return to_batches(windows, batch_size), info


def _weighted_batches(sources: list[str], weights: Sequence[float], **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    from .observer import mix_calibration

    if len(weights) != len(sources):
        raise ValueError(f"--calib-weights needs one weight per --calib source ({len(sources)}), got {len(weights)}")
    parts, infos = [], []
    for source, weight in zip(sources, weights):
        batches, info = calibration_batches([source], **kwargs)
        parts.append((batches, weight))
        infos.append(info)
    info = {"sources": sources, "weights": list(weights), "rows": sum(i["rows"] for i in infos),
            "tokens": sum(i["tokens"] for i in infos), "tokenizer": infos[0]["tokenizer"]}  # fmt: skip
    return mix_calibration(parts), info
