"""moekit checkpoints: one save/load entry point for every model moekit trains or reads.

``save_checkpoint(model, dir)`` writes a directory with ``model.safetensors`` and ``config.json``
(``{"format": "moekit", "version": ..., "model": <MODELS name or null>, "class": <import path>,
"config": {kwargs}}``); nothing is ever pickled. What gets saved depends on the model:

* a **registered** model (``moekit.register_model`` / ``moekit.registry.MODELS``): ``load_checkpoint(dir)``
  rebuilds it from its builder name and keyword arguments (``model.config()``, or ``config=``);
* **any other** ``nn.Module``: its weights; ``load_checkpoint(dir, model=MyNet(...))`` loads them into
  the instance you pass (strict: every tensor must match);
* an **expert-parallel** model (``groups=``, every rank calls it): a sharded checkpoint
  (``moekit.distributed.checkpoint``) that ``load_checkpoint`` reads on any number of ranks, or on one;
* a model with **routed adapters** (``insert_routed_adapters``): the backbone's weights plus an
  ``adapters/`` directory (``save_adapters``: adapters, routers and every other trainable tensor);
  ``load_checkpoint`` puts the adapters back with the same trainable tensors.

Loading is strict and allocates nothing before the checks: every size in the config must fit the
largest tensor extent in the safetensors header (``check_config_sizes``), then the model is built on
the meta device (or the instance you pass is used) and its tensor names and shapes are compared with
the header, so a corrupt or hostile ``config.json`` cannot make it allocate absurd sizes;
integer tensors are never cast into float parameters (nor the reverse), NaN/inf weights are refused,
and a checkpoint of a newer format ``version`` is refused.

Saving writes into a temporary sibling directory and renames it into place
(``moekit.reporting.atomic_directory``), so a failed or interrupted save never leaves a partial
checkpoint, and never writes over the directory the model was loaded from (``model_sources``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._checks import check_finite_tensors, check_tensor_dtypes, check_tensor_names
from .checkpoint_format import (
    ADAPTERS_DIR,
    CONFIG_NAME,
    DISTRIBUTED_FORMAT,
    FORMAT,
    VERSION,
    WEIGHTS_NAME,
    check_config_sizes,
    check_format_version,
    read_config_json,
)
from .registry import MODELS
from .reporting import atomic_directory

if TYPE_CHECKING:
    from .distributed.groups import ExpertParallelGroups

__all__ = [
    "save_checkpoint", "write_checkpoint", "load_checkpoint", "read_checkpoint_config", "read_config_json",
    "checkpoint_format", "check_format_version", "check_config_sizes", "header_shapes", "model_sources",
    "WEIGHTS_NAME", "CONFIG_NAME", "ADAPTERS_DIR",
]  # fmt: skip

#: the attribute ``load_checkpoint`` sets on the model it returns: the directory it was read from
SOURCE_ATTR = "_moekit_source"


def model_sources(model: nn.Module) -> list[Path]:
    """The directories ``model`` was loaded from: a moekit checkpoint (``load_checkpoint``) or a
    Hugging Face directory (``from_pretrained`` records it as ``name_or_path``). Savers refuse to
    write over them."""
    names = [getattr(model, SOURCE_ATTR, None), getattr(model, "name_or_path", None)]
    return [Path(n) for n in names if isinstance(n, (str, os.PathLike)) and str(n) and Path(n).is_dir()]


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered_name(model: nn.Module) -> str | None:
    return next((e.name for e in MODELS.entries() if e.factory is type(model)), None)


def _model_spec(model: nn.Module, name: str | None, config: Mapping[str, Any] | None) -> tuple[str | None, dict | None]:
    """(builder name, builder kwargs), or (None, None) for a model that is neither registered nor named."""
    name = name if name is not None else _registered_name(model)
    if name is None:
        if config is not None:
            raise ValueError(f"config= needs a registered builder: pass name= too, or register "
                             f"{type(model).__name__} with @moekit.register_model")  # fmt: skip
        return None, None
    MODELS.entry(name)
    if config is None:
        if not callable(getattr(model, "config", None)):
            raise ValueError(f"{type(model).__name__} is registered as {name!r} but has no config() method returning "
                             "its keyword arguments; add one, or pass config={...} to save_checkpoint")  # fmt: skip
        config = model.config()
    return name, dict(config)


def _split_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The backbone's tensors (without the routed adapters') and whether the model has adapters."""
    from .layers.sites import ADAPTERS_ATTR

    if not hasattr(model, ADAPTERS_ATTR):
        return state, False
    prefix = f"{ADAPTERS_ATTR}."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}, True


def _is_expert_parallel(model: nn.Module) -> bool:
    from .distributed.layer import ExpertParallelMoE

    return any(isinstance(m, ExpertParallelMoE) for m in model.modules())


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    groups: ExpertParallelGroups | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Save ``model`` to ``directory`` (created; absent or empty unless ``overwrite``). See the module doc.

    Args:
        model: the module to save (its full ``state_dict``, buffers included).
        name: its builder in ``moekit.registry.MODELS`` (default: the registered class of ``model``;
            an unregistered model is saved as weights only).
        config: keyword arguments of the builder (default: ``model.config()``).
        groups: the expert-parallel process groups of a sharded model (collective: every rank calls it).
        overwrite: replace an earlier output of moekit there (never a directory moekit did not write, nor
            one holding files moekit did not write).
        inputs: paths the output must not overlap, besides the directories ``model`` was loaded from.
    """
    sources = [*inputs, *model_sources(model)]
    if groups is not None or _is_expert_parallel(model):
        if groups is None:
            raise ValueError(f"{type(model).__name__} has expert-parallel layers: pass groups= (every rank calls "
                             "save_checkpoint with its ExpertParallelGroups)")  # fmt: skip
        from .distributed.checkpoint import save_distributed_checkpoint

        name, config = _model_spec(model, name, config)
        return save_distributed_checkpoint(model, directory, groups, name=name, config=config, overwrite=overwrite,
                                           inputs=sources)  # fmt: skip
    directory = Path(directory)
    spec = _model_spec(model, name, config)
    with atomic_directory(directory, overwrite=overwrite, inputs=sources, writer="save_checkpoint") as stage:
        _write(model, stage, spec)
    return directory


def write_checkpoint(
    model: nn.Module, directory: str | os.PathLike[str], *, name: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write the checkpoint files of ``model`` into the existing directory ``directory``: the staging
    directory of an ``atomic_directory`` that holds other files too (e.g. ``moekit merge``'s report).
    Arguments as in ``save_checkpoint``; use that to write a checkpoint on its own."""
    directory = Path(directory)
    _write(model, directory, _model_spec(model, name, config))
    return directory


def _write(model: nn.Module, directory: Path, spec: tuple[str | None, dict | None]) -> None:
    name, config = spec
    meta = {"format": FORMAT, "version": VERSION, "model": name, "class": _class_path(model), "config": config}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state, has_adapters = _split_adapters(model, state)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if has_adapters:
        from .layers.adapters import save_adapters

        save_adapters(model, directory / ADAPTERS_DIR)


def checkpoint_format(directory: str | os.PathLike[str]) -> str:
    """``"moekit"``, ``"moekit-expert-parallel"`` or ``"huggingface"``: what ``config.json`` in ``directory``
    describes (ValueError for anything else)."""
    meta = read_config_json(directory, what="model")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt in (FORMAT, DISTRIBUTED_FORMAT):
        return fmt
    if isinstance(meta, dict) and "model_type" in meta:
        return "huggingface"
    raise ValueError(f"{str(Path(directory) / CONFIG_NAME)!r} is neither a moekit checkpoint config "
                     "nor a Hugging Face model config")  # fmt: skip


def read_checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a (single-file) moekit checkpoint, checked for its format."""
    meta = read_config_json(directory)
    path = Path(directory) / CONFIG_NAME
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a moekit checkpoint config (expected format {FORMAT!r})")
    if meta.get("model") is not None and not isinstance(meta.get("config"), dict):
        raise ValueError(f"{str(path)!r} names model {meta['model']!r} but has no config object")
    check_format_version(meta, VERSION, path)
    return meta


def _unregistered_error(directory: Path, meta: Mapping[str, Any]) -> ValueError:
    cls = meta.get("class") or "an unregistered model"
    short = str(cls).rsplit(".", 1)[-1]
    return ValueError(
        f"checkpoint {str(directory)!r} holds the weights of {cls}, which moekit cannot rebuild by itself: "
        f"load them into an instance, load_checkpoint(path, model={short}(...)), or register the class with "
        f"@moekit.register_model (and a config() method returning its keyword arguments) before saving"
    )


#: builder arguments (at any depth of a checkpoint config) that are tensor extents: each must be at most the
#: largest extent of any tensor in the weights file. ``depth``-like counts are bounded by the tensor count.
def _build(directory: Path, meta: Mapping[str, Any]) -> nn.Module:
    name = meta.get("model")
    if name is None:
        raise _unregistered_error(directory, meta)
    if name not in MODELS:
        raise ValueError(
            f"checkpoint {str(directory)!r} names model {name!r}, which is not registered in this process; "
            f"import the module that defines it (with @moekit.register_model({name!r})) first, or pass "
            f"model=an instance. Registered: {', '.join(MODELS.names())}"
        )
    try:
        return MODELS.create(name, **meta["config"])
    except TypeError as err:
        raise ValueError(f"checkpoint config {str(directory / CONFIG_NAME)!r} does not fit {name!r}: {err}") from None
    except (ValueError, RuntimeError, OverflowError) as err:  # RuntimeError: e.g. torch's storage size overflow
        raise ValueError(f"checkpoint config {str(directory / CONFIG_NAME)!r}: {err}") from None


def header_shapes(weights: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header (nothing else is read)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint weights {str(weights)!r}: {err}") from None


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    groups: ExpertParallelGroups | None = None,
    map_location: str | torch.device = "cpu",
    check_finite: bool = True,
) -> nn.Module:
    """Load the checkpoint in ``directory`` (any form ``save_checkpoint`` writes; see the module doc).

    Args:
        model: load the weights into this instance (strict) instead of rebuilding the saved model; needed
            for models saved without a registered builder. A model with routed adapters is given as the
            fresh backbone (the adapters are inserted again).
        groups: expert-parallel checkpoints: shard the rebuilt model over these process groups (collective);
            default: one process holds every expert.
        map_location: device of the loaded tensors.
        check_finite: refuse weights holding NaN or inf.
    Returns the model (``model`` itself when given). Names, shapes and dtype kinds must match.
    """
    from .layers.sites import ADAPTERS_ATTR

    directory = Path(directory)
    meta = read_config_json(directory)
    if isinstance(meta, dict) and meta.get("format") == DISTRIBUTED_FORMAT:
        from .distributed.checkpoint import load_distributed_model, load_distributed_state

        if model is not None:
            return load_distributed_state(model, directory)
        return load_distributed_model(directory, groups)
    meta = read_checkpoint_config(directory)
    adapters = directory / ADAPTERS_DIR
    if model is not None and adapters.is_dir() and hasattr(model, ADAPTERS_ATTR):
        raise ValueError(f"checkpoint {str(directory)!r} holds routed adapters: pass the backbone without adapters")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {WEIGHTS_NAME}")
    shapes = header_shapes(weights)
    if model is not None:
        expected = model.state_dict()
    else:
        check_config_sizes(meta.get("config"), shapes, where=str(directory / CONFIG_NAME))
        with torch.device("meta"):  # the config's sizes, checked against the file before any allocation
            expected = _build(directory, meta).state_dict()
    against = "the model you passed" if model is not None else f"its config ({meta.get('model')!r})"
    check_tensor_names({k: list(v.shape) for k, v in expected.items()}, shapes, where=str(weights), against=against)
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint weights {str(weights)!r}: {err}") from None
    check_tensor_dtypes(state, expected, where=str(weights))
    if check_finite:
        check_finite_tensors(state.items(), where=str(weights))
    target = model if model is not None else _build(directory, meta)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        what = "the model you passed" if model is not None else "its config"
        raise ValueError(f"checkpoint weights {str(weights)!r} do not match {what}: {err}") from None
    target = target.to(map_location)
    if adapters.is_dir():
        from .layers.adapters import load_adapters

        load_adapters(target, adapters)
    setattr(target, SOURCE_ATTR, str(directory))
    return target
