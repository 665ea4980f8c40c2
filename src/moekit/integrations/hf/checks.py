"""Checks of the Hugging Face checkpoints moekit loads for merging, analysis and compression.

A model is used only if it loads exactly: safetensors files (nothing is unpickled), every tensor the
architecture needs present with its shape, no tensor left over, no NaN/inf weight. transformers
itself only prints a load report and initialises what is missing at random (a merge would then use
a random router). ``check_loaded_tensors`` is the one check of a load, used by ``load_hf_model``
(the whole model, through ``check_loaded_model``) and by the streaming reader
(``HFCheckpointSource``, one module at a time); ``require_safetensors`` is the one check of the
files, used by both.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from ..._checks import check_finite_tensors, raise_for_tensor_problems

__all__ = [
    "SAFETENSORS_FILES", "require_safetensors", "check_config_fits_weights", "check_loaded_tensors",
    "check_loaded_model", "quiet_transformers",
]  # fmt: skip

SINGLE_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
#: a single-file or a sharded safetensors checkpoint
SAFETENSORS_FILES = (SINGLE_NAME, INDEX_NAME)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(directory: str | os.PathLike[str], architecture: str | None = None) -> None:
    """Raise unless ``directory`` holds a safetensors checkpoint; for a pickled one (``pytorch_model.bin``)
    the ``ValueError`` says that only safetensors is read and how to convert it (``architecture``: the
    transformers class in ``config.json``); with no weights at all, ``FileNotFoundError``."""
    directory = Path(directory)
    if any((directory / name).is_file() for name in SAFETENSORS_FILES):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        cls = architecture or "AutoModel"
        raise ValueError(
            f"{str(directory)!r} holds only {pickled[0]} (a pickle): moekit reads only safetensors checkpoints "
            f"and never unpickles. Convert it once, where you trust the file: python -c \"import transformers as t; "
            f"t.{cls}.from_pretrained('{directory}').save_pretrained('{directory}-safetensors')\""
        )
    raise FileNotFoundError(f"{str(directory)!r} has no {SAFETENSORS_FILES[0]} (nor a sharded {SAFETENSORS_FILES[1]})")


#: config fields that are tensor extents in every causal LM / MoE family (not ``max_position_embeddings``:
#: rotary models have no position table), and counts of layers
HF_SIZE_KEYS = frozenset({
    "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "num_local_experts", "num_experts", "vocab_size", "d_model", "d_ff",
})  # fmt: skip
HF_COUNT_KEYS = frozenset({"num_hidden_layers", "num_layers", "num_decoder_layers"})


def check_config_fits_weights(directory: str | os.PathLike[str], config: Any) -> None:
    """Refuse a ``config.json`` (a transformers config) whose sizes no tensor of the directory's
    safetensors files could hold, from the headers alone, before transformers builds the model: it
    would otherwise initialise full-size tensors for every mismatched one (``num_local_experts=10**6``
    allocates a million experts) before moekit's strict check sees the load report."""
    import json

    from safetensors import SafetensorError, safe_open

    from ...checkpoint_format import check_config_sizes

    directory = Path(directory)
    index = directory / INDEX_NAME
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_NAME]
        shapes: dict[str, list[int]] = {}
        for name in files:
            with safe_open(str(directory / name), framework="pt") as f:
                shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the safetensors files of {str(directory)!r}: {err}") from None
    values = config.to_dict() if hasattr(config, "to_dict") else config
    check_config_sizes(values, shapes, where=str(directory / "config.json"), size_keys=HF_SIZE_KEYS,
                       count_keys=HF_COUNT_KEYS)  # fmt: skip


def check_loaded_tensors(
    *,
    where: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, Sequence[int], Sequence[int]]] = (),
    errors: Sequence[str] = (),
    tensors: Iterable[tuple[str, Tensor]] = (),
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected and mismatched tensor (``(name, shape in
    the checkpoint, shape in the model)``), the first loader error, and every floating-point tensor
    of ``tensors`` (name, tensor) holding NaN or inf, of the weights in ``where``."""
    raise_for_tensor_problems(missing=missing, unexpected=unexpected, mismatched=mismatched, where=where)
    if errors:
        raise ValueError(f"the weights in {where!r} do not load: {' '.join(str(errors[0]).split())}")
    check_finite_tensors(tensors, where=where)


def check_loaded_model(model: nn.Module, info: Mapping[str, Any], *, where: str, check_finite: bool = True) -> None:
    """``check_loaded_tensors`` for ``from_pretrained(..., output_loading_info=True,
    ignore_mismatched_sizes=True)``: its ``info`` and, with ``check_finite``, every tensor of ``model``."""
    check_loaded_tensors(
        where=where,
        missing=info.get("missing_keys") or (),
        unexpected=info.get("unexpected_keys") or (),
        mismatched=info.get("mismatched_keys") or (),
        errors=info.get("error_msgs") or (),
        tensors=model.state_dict().items() if check_finite else (),
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without its load reports and warnings (moekit raises its own errors), and with
    progress bars only on a terminal."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if not sys.stderr.isatty():
        logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
