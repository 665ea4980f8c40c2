"""The layout of moekit's checkpoint directories: file names, format names and versions, and reading
``config.json`` -- shared by ``moekit.checkpoint`` (one process) and ``moekit.distributed.checkpoint``
(sharded), so neither imports the other's internals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "ADAPTERS_DIR", "FORMAT", "DISTRIBUTED_FORMAT", "VERSION",
           "check_format_version", "read_config_json"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ADAPTERS_DIR = "adapters"
FORMAT = "moekit"
DISTRIBUTED_FORMAT = "moekit-expert-parallel"
VERSION = 1


def check_format_version(meta: Mapping[str, Any], newest: int, path: str | os.PathLike[str]) -> None:
    """Refuse a config whose format ``version`` (1 when absent) is not an integer in ``[1, newest]``
    (a checkpoint written by a newer moekit may mean something this one would silently misread)."""
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(path)!r} has an invalid format version {version!r} (expected an integer >= 1)")
    if version > newest:
        raise ValueError(
            f"{str(path)!r} has format version {version}, newer than this moekit reads (<= {newest}); upgrade moekit"
        )


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
