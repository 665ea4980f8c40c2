"""The layout of moekit's checkpoint directories: file names, format names and versions, and reading
``config.json`` -- shared by ``moekit.checkpoint`` (one process) and ``moekit.distributed.checkpoint``
(sharded), so neither imports the other's internals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .reporting import read_json

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "ADAPTERS_DIR", "FORMAT", "DISTRIBUTED_FORMAT", "VERSION",
           "check_config_sizes", "check_format_version", "read_config_json"]

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
    return read_json(path, what=f"{what} config")


SIZE_KEYS = frozenset({
    "num_experts", "experts_per_layer", "router_outputs_per_layer", "num_keys", "num_tags", "dim", "hidden",
    "vocab_size", "max_seq_len", "in_dim", "num_classes", "expert_dim", "expert_hidden", "tower_hidden",
    "bottleneck", "width", "in_channels", "out_channels", "gate_channels", "out_dim",
})  # fmt: skip
COUNT_KEYS = frozenset({"depth"})


def _config_sizes(config: Any, keys: frozenset[str], path: str = "") -> Iterable[tuple[str, str, int]]:
    """``(where, key, value)`` for every integer under one of ``keys`` in ``config`` (nested dicts
    and lists, e.g. ``router_kwargs``, ``tasks``)."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "num_experts" and config.get("experts_per_layer") is not None:
                continue  # only the default of the per-layer sizes (a merged MoELM keeps the original count)
            if key in keys:
                values = value if isinstance(value, (list, tuple)) else [value]
                for v in values:
                    if isinstance(v, int) and not isinstance(v, bool):
                        yield where, str(key), v
            else:
                yield from _config_sizes(value, keys, where)
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            yield from _config_sizes(value, keys, f"{path}[{i}]")


def check_config_sizes(
    config: Any,
    shapes: Mapping[str, Sequence[int]],
    *,
    where: str,
    size_keys: frozenset[str] = SIZE_KEYS,
    count_keys: frozenset[str] = COUNT_KEYS,
) -> None:
    """Refuse a checkpoint config whose sizes no tensor of its weights file (``shapes``, from the header)
    could hold, before anything is built: a corrupt or hostile ``num_experts=10**9`` would otherwise make
    a router's constructor allocate index tables or loop over experts (even on the meta device), or
    transformers initialise full-size tensors for the mismatched ones. ``size_keys`` are tensor extents
    (at most the largest extent in ``shapes``), ``count_keys`` counts of layers (at most the tensor count)."""
    extent = max((max(shape, default=1) for shape in shapes.values()), default=1)
    for name, key, value in _config_sizes(config, size_keys | count_keys):
        limit = len(shapes) if key in count_keys else extent
        if value > limit:
            what = f"the {len(shapes)} tensors" if key in count_keys else f"the largest tensor extent ({extent})"
            raise ValueError(
                f"checkpoint config {where!r}: {name}={value} exceeds {what} of its weights: "
                "the config does not describe these weights (corrupt or edited config.json)"
            )
