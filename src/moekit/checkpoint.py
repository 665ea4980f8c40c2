"""moekit checkpoints: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` = ``{"format": "moekit", "version": ..., "model": <MODELS name>, "config": {kwargs}}``;
``load_checkpoint`` rebuilds the model with ``MODELS.create(name, **config)`` and loads the tensors
(strict). Nothing is unpickled. Saving writes into a temporary sibling directory and renames it into
place, so a failed save never leaves a partial checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .registry import MODELS
from .reporting import atomic_directory

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_config", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "moekit"
VERSION = 1


def _model_spec(model: nn.Module, name: str | None, config: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if name is None:
        name = next((e.name for e in MODELS.entries() if e.factory is type(model)), None)
        if name is None:
            raise ValueError(f"{type(model).__name__} is not in the MODELS registry; pass name=")
    MODELS.entry(name)
    if config is None:
        if not callable(getattr(model, "config", None)):
            raise ValueError(f"{type(model).__name__} has no config() method; pass config=")
        config = model.config()
    return name, dict(config)


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` to ``directory`` (created; must not exist unless ``overwrite``).

    Args:
        model: the module to save (its full ``state_dict``, buffers included).
        directory: output directory.
        name: its builder in ``moekit.registry.MODELS`` (default: the registered class of ``model``).
        config: keyword arguments of the builder (default: ``model.config()``).
        overwrite: replace an existing directory.
    """
    directory = Path(directory)
    name, config = _model_spec(model, name, config)
    text = json.dumps({"format": FORMAT, "version": VERSION, "model": name, "config": config}, indent=2)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(directory, overwrite=overwrite) as stage:
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        (stage / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    return directory


def read_config_json(directory: str | os.PathLike[str], *, what: str = "checkpoint") -> Any:
    """The parsed ``config.json`` of the directory ``directory`` (a ``what``), with errors that name the path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(directory)!r} has no {CONFIG_NAME}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {what} config {str(path)!r}: {err}") from None


def read_checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint (checked for format and model name)."""
    meta = read_config_json(directory)
    path = Path(directory) / CONFIG_NAME
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{str(path)!r} is not a moekit checkpoint config (expected format {FORMAT!r})")
    MODELS.entry(meta.get("model"))
    return meta


def load_checkpoint(directory: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in ``directory`` and load its weights (strict)."""
    meta = read_checkpoint_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint weights {str(weights)!r}: {err}") from None
    try:
        model = MODELS.create(meta["model"], **meta["config"])
    except TypeError as err:
        raise ValueError(f"checkpoint config {str(Path(directory) / CONFIG_NAME)!r} does not fit {meta['model']!r}: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint weights {str(weights)!r} do not match its config: {err}") from None
    return model.to(map_location)
