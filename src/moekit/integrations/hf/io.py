"""Save and load merged Hugging Face models.

``save_hf_model`` writes ``save_pretrained`` output (safetensors + config.json [+ tokenizer]) into a
temporary sibling directory and renames it into place, so a failure never leaves a partial directory.

``load_hf_model`` loads any checkpoint of a registered family:

* unmerged and plain-form checkpoints are standard: it simply calls the architecture's
  ``from_pretrained`` (so does any code that knows nothing of moekit);
* exact-form checkpoints (``config.moekit_merge["form"] == "exact"``) have G experts per block but
  routers with E outputs and an ``expert_map`` buffer, which stock transformers rejects (size
  mismatch). moekit loads them through ``from_pretrained`` of a subclass of the architecture whose
  ``__init__`` first gives each merged block its G experts and ``RemappedRouter``; transformers'
  loader then fills every tensor as usual (meta-device init, tied weights, dtype, device map);
* checkpoints with moekit routers (``config.moekit_routers``, written by ``replace_routers``) are
  loaded the same way: the subclass puts the recorded moekit routers into the blocks first.

Either way the load is strict (``checks.py``): safetensors only, no missing, unexpected or
mismatched tensor, no NaN/inf weight; transformers' own load report is silenced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ...reporting import atomic_directory
from .base import family_for
from .checks import check_config_fits_weights, check_loaded_model, quiet_transformers, require_safetensors
from .moekit_only import clear_moekit_only, mark_moekit_only
from .replace import ROUTERS_CONFIG_KEY, apply_router_record, gates
from .stack import MERGE_CONFIG_KEY

__all__ = ["save_hf_model", "load_hf_model", "layout_class", "architecture", "needs_moekit_layout"]


def save_hf_model(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """``model.save_pretrained`` (and ``tokenizer.save_pretrained``) into ``directory``, atomically.

    ``directory`` must be absent or empty unless ``overwrite`` (which replaces only an earlier output
    of moekit); it must not overlap ``inputs`` nor the directory the model was loaded from. Returns its
    path. An exact-form merged model is marked so that stock ``from_pretrained`` refuses it with a
    message naming ``moekit.load_hf_model``.
    """
    from ...checkpoint import model_sources

    directory = Path(directory)
    sources = [*inputs, *model_sources(model)]
    with atomic_directory(directory, overwrite=overwrite, inputs=sources, writer="save_hf_model") as stage:
        with quiet_transformers():
            model.save_pretrained(stage)
        if isinstance(getattr(model.config, ROUTERS_CONFIG_KEY, None), dict):
            mark_moekit_only(stage, what="with moekit routers (moekit.integrations.hf.replace_routers)",
                             field=ROUTERS_CONFIG_KEY, name=directory.name)  # fmt: skip
        elif needs_moekit_layout(model.config):
            mark_moekit_only(stage, name=directory.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return directory


def layout_class(cls: type) -> type:
    """A subclass of the architecture ``cls`` (same name) that builds the layout recorded in
    ``config.moekit_merge`` before weights are loaded: exact-form blocks (G experts, ``RemappedRouter``,
    MoNE novices where the record lists them) and compressed experts (``CompressedExperts`` with the recorded ranks and kept rows); or the moekit
    routers recorded in ``config.moekit_routers`` (``replace_routers``)."""

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        from .compressed import compressed_bank

        cls.__init__(self, config, *args, **kwargs)
        routers = getattr(config, ROUTERS_CONFIG_KEY, None)
        if isinstance(routers, dict):
            apply_router_record(self, routers)
        family = family_for(config)
        blocks = family.blocks(self)
        record = getattr(config, MERGE_CONFIG_KEY, None)
        for name, layer in (record["layers"] if isinstance(record, dict) else {}).items():
            if name not in blocks:
                raise ValueError(f"config.{MERGE_CONFIG_KEY} names block {name!r}, which this model does not have")
            G, E = int(layer["experts"]), int(layer["router_outputs"])
            if record.get("form") == "exact" and G < E:
                family.resize_experts(blocks[name], G)
                if layer.get("novices"):
                    family.add_novices(blocks[name], [int(e) for e in layer["novices"]], config)
                else:
                    family.wrap_router(blocks[name], torch.zeros(E, dtype=torch.long), G)
            if "compression" in layer:
                family.write_compressed(blocks[name], compressed_bank(G, layer["compression"]), config)
            # every tensor of the block comes from the checkpoint (load_hf_model checks that strictly):
            # skip the family's own weight init, which assumes E experts and a stock router
            blocks[name]._is_hf_initialized = True

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__, "__doc__": cls.__doc__})


def architecture(config: Any) -> type:
    """The transformers class named by ``config.architectures``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"config.architectures={names!r} names no transformers model class")


def needs_moekit_layout(config: Any) -> bool:
    """Whether the checkpoint's blocks differ from what its stock config builds (exact form, compressed
    experts, moekit routers)."""
    merge = getattr(config, MERGE_CONFIG_KEY, None)
    if isinstance(getattr(config, ROUTERS_CONFIG_KEY, None), dict):
        return True
    if not isinstance(merge, dict):
        return False
    layers = merge.get("layers") or {}
    return merge.get("form") == "exact" or any("compression" in layer for layer in layers.values())


def load_hf_model(
    directory: str | os.PathLike[str], *, check_finite: bool = True, **from_pretrained_kwargs: Any
) -> nn.Module:
    """Load a Hugging Face MoE checkpoint of a registered family, merged (either form) or not.

    Strict, unlike a bare ``from_pretrained``: only safetensors files are read, and a missing,
    unexpected or mismatched tensor, or (with ``check_finite``) a NaN/inf weight, is a ``ValueError``
    naming the tensors (``checks.check_loaded_model``). Raises FileNotFoundError for a missing
    directory or config, ValueError for an unknown family.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(directory)!r} has no config.json")
    config = clear_moekit_only(AutoConfig.from_pretrained(directory))
    family_for(config)
    cls = architecture(config)
    require_safetensors(directory, cls.__name__)
    check_config_fits_weights(directory, config)
    kwargs = {**from_pretrained_kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True,
              "use_safetensors": True}  # fmt: skip
    try:
        with quiet_transformers():
            model, info = (layout_class(cls) if needs_moekit_layout(config) else cls).from_pretrained(
                directory, config=config, **kwargs
            )
    except (OSError, RuntimeError, SafetensorError, KeyError) as err:  # unreadable or truncated files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the Hugging Face model in {str(directory)!r}: {first}") from None
    for gate in gates(model).values():
        gate.restore_constants()
    check_loaded_model(model, info, where=str(directory), check_finite=check_finite)
    return model
