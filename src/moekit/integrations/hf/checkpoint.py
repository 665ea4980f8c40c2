"""Hugging Face checkpoints read and written one module at a time (streaming compression).

``HFCheckpoint`` opens a model directory lazily: config, the safetensors files (``model.safetensors``
or a ``model.safetensors.index.json`` with shards), an empty model skeleton on the meta device built
the way ``from_pretrained`` builds it (``get_init_context``: dtype from the config, ``keep_in_fp32``
plan), and the key conversions transformers applies between the on-disk names (e.g. Mixtral's
per-expert ``block_sparse_moe.experts.{i}.w1``) and the in-memory fused tensors.

``HFCheckpointSource`` (a ``WeightSource``) materialises one module -- a decoder layer, the
embeddings -- by reading only that module's tensors (``moekit.merging.shards.read_tensors``) and loading them through
transformers' own ``convert_and_load_state_dict_in_model`` with the same conversions; it refuses
missing, unexpected-for-the-module or mismatched tensors and NaN/Inf values, initialises
non-persistent buffers (rotary ``inv_freq``) with the model's ``_init_weights``, and frees the module
again (back to the meta device). ``unused_keys`` lists checkpoint tensors no loaded module took.

``HFShardWriter`` writes the output: tensors outside the units are copied as they are on disk; each
compressed unit's state dict is converted back to the on-disk names (``revert_weight_conversion``,
as ``save_pretrained`` does) and written as one shard; ``finish`` writes the index, the config and
the input's other files (tokenizer, generation config).

These steps mirror transformers 5.x ``from_pretrained`` / ``save_pretrained``; they use its loading
module (``transformers.core_model_loading``), so a change there is a change here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ...merging.memory import release_memory
from ...merging.pipeline import WeightSource
from ...merging.shards import read_tensors, save_tensors, tensor_sizes
from ...merging.stack import LayerStack
from .base import MoEFamily, family_for
from .checks import INDEX_NAME, SINGLE_NAME, check_loaded_tensors, require_safetensors
from .moekit_only import clear_moekit_only, mark_moekit_only

__all__ = ["HFCheckpoint", "HFCheckpointSource", "HFShardWriter", "weight_files", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
ASYNC_FLAG = "HF_DEACTIVATE_ASYNC_LOAD"


def weight_files(directory: Path) -> dict[str, Path]:
    """``{tensor name on disk: safetensors file}`` of a model directory."""
    require_safetensors(directory)  # a pickled checkpoint (the error says how to convert it) or no weights
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"corrupt safetensors index {str(index)!r}: {err}") from None
        files = {k: directory / f for k, f in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{str(index)!r} names shard files that do not exist: {missing}")
        return files
    from safetensors import SafetensorError, safe_open

    single = directory / SINGLE_NAME
    try:
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {str(single)!r}: {err}") from None


@contextlib.contextmanager
def _sequential_quiet_load() -> Iterator[None]:
    """transformers' loader without its progress bars and its thread pool (one tensor converted at a
    time keeps the memory peak at one module) while moekit loads module by module."""
    from transformers.utils import logging

    enabled, previous = logging.is_progress_bar_enabled(), os.environ.get(ASYNC_FLAG)
    logging.disable_progress_bar()
    os.environ[ASYNC_FLAG] = "1"
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
        if previous is None:
            os.environ.pop(ASYNC_FLAG, None)
        else:
            os.environ[ASYNC_FLAG] = previous


class HFCheckpoint:
    """A Hugging Face model directory opened lazily (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from transformers import AutoConfig

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(self.directory)!r} has no config.json")
        self.config = clear_moekit_only(AutoConfig.from_pretrained(self.directory))
        self.family: MoEFamily = family_for(self.config)
        self.files = weight_files(self.directory)
        self.dtype = self._dtype()

    def _dtype(self) -> torch.dtype:
        dtype = getattr(self.config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            return dtype
        from safetensors import safe_open

        for key, path in self.files.items():  # like from_pretrained: the first floating tensor's dtype
            with safe_open(str(path), "pt") as f:
                t = f.get_slice(key)
                name = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
                if t.get_dtype() in name:
                    return name[t.get_dtype()]
        return torch.get_default_dtype()

    def model_class(self) -> type:
        """The architecture class (``config.architectures``), with moekit's layout for merged checkpoints."""
        from .io import architecture, layout_class, needs_moekit_layout

        cls = architecture(self.config)
        return layout_class(cls) if needs_moekit_layout(self.config) else cls

    def skeleton(self) -> nn.Module:
        """The model with every tensor on the meta device (no memory), as ``from_pretrained`` builds it."""
        from transformers.utils.generic import ContextManagers

        cls = self.model_class()
        with ContextManagers(cls.get_init_context(self.dtype, False, False, None)):
            model = cls(copy.deepcopy(self.config))
        return model.eval()

    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of every tensor on disk (from the safetensors headers)."""
        out: dict[str, int] = {}
        for path in sorted(set(self.files.values())):
            out.update(tensor_sizes(path))
        return {k: out[k] for k in self.files}


class HFCheckpointSource(WeightSource):
    """Loads modules of ``model`` (a skeleton from ``checkpoint.skeleton()``) from the checkpoint."""

    def __init__(self, checkpoint: HFCheckpoint, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.checkpoint, self.model = checkpoint, model
        self.mapping = get_model_conversion_mapping(model)
        self.dtype_plan = model._get_dtype_plan(checkpoint.dtype)
        renamings = [e for e in self.mapping if isinstance(e, WeightRenaming)]
        converters = [e for e in self.mapping if isinstance(e, WeightConverter)]
        meta = model.state_dict()
        self.targets = {
            key: rename_source_key(key, renamings, converters, model.base_model_prefix, meta)[0]
            for key in checkpoint.files
        }
        self.tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        self.loaded: set[str] = set()
        # before any work (each module's load checks shapes and values again): every file tensor has a place
        # in the model, and every model tensor (but tied copies) a source in the files
        check_loaded_tensors(where=str(checkpoint.directory),
                             missing=sorted(set(meta) - set(self.targets.values()) - self.tied),
                             unexpected=sorted(k for k, t in self.targets.items() if t not in meta))  # fmt: skip

    def disk_keys(self, name: str) -> list[str]:
        """Checkpoint tensors that load into module ``name`` (``""`` = the whole model)."""
        return [k for k, t in self.targets.items() if not name or t == name or t.startswith(f"{name}.")]

    def unused_keys(self) -> list[str]:
        """Checkpoint tensors that no loaded module took."""
        return sorted(set(self.targets) - self.loaded)

    def load(self, stack: LayerStack, names: Sequence[str]) -> None:
        for name in names:
            self._load(name)

    def _load(self, name: str) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        keys = self.disk_keys(name)
        state: dict[str, Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.checkpoint.files[key], []).append(key)
        for path, file_keys in by_file.items():
            state.update(read_tensors(path, file_keys))
        where = str(self.checkpoint.directory)
        check_loaded_tensors(where=where, tensors=state.items())
        config = LoadStateDictConfig(
            device_map={"": "cpu"}, dtype=self.checkpoint.dtype, dtype_plan=self.dtype_plan, weight_mapping=self.mapping
        )
        with _sequential_quiet_load():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        del state
        release_memory()  # the read tensors were copied into the module's own (fused) tensors
        self.loaded.update(keys)
        module = self.model.get_submodule(name) if name else self.model
        prefix = f"{name}." if name else ""
        missing = sorted(k for k in info.missing_keys if k.startswith(prefix) and k not in self.tied)
        check_loaded_tensors(where=where, missing=missing, mismatched=info.mismatched_keys)
        if any(k in self.tied for k in info.missing_keys if k.startswith(prefix)):
            self.model.tie_weights()
        self._init_buffers(module)

    def _init_buffers(self, module: nn.Module) -> None:
        """Non-persistent buffers (never in a checkpoint) get their values from the model's init."""
        for owner in module.modules():
            names = [n for n, b in owner.named_buffers(recurse=False) if b is not None and b.device.type == "meta"]
            if not names:
                continue
            for n in names:
                owner.register_buffer(n, torch.empty_like(getattr(owner, n), device="cpu"),
                                      persistent=n not in owner._non_persistent_buffers_set)  # fmt: skip
            self.model._init_weights(owner)

    def release(self, stack: LayerStack, names: Sequence[str]) -> None:
        for name in names:
            (self.model.get_submodule(name) if name else self.model).to("meta")
        release_memory()

    def used_conversions(self) -> list[Any]:
        return [c for c in self.mapping if c.was_used()]


class HFShardWriter:
    """Writes a compressed model as safetensors shards in ``directory`` (see the module docstring).

    Args:
        directory: the (staging) output directory.
        source: the input's source (disk names and conversions).
        units: the stack's unit names (one shard each, plus one for everything else).
    """

    def __init__(self, directory: Path, source: HFCheckpointSource, units: Sequence[str]) -> None:
        self.directory, self.source, self.units = Path(directory), source, list(units)
        self.count = len(self.units) + 1

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.count:05d}.safetensors"

    def _path(self, index: int) -> Path:
        return self.directory / self.shard_name(index)

    def write_trunk(self) -> None:
        """Everything outside the units, as it is on disk."""
        if self._path(len(self.units)).is_file():
            return
        inside = set().union(*(self.source.disk_keys(u) for u in self.units)) if self.units else set()
        by_file: dict[Path, list[str]] = {}
        for key, path in self.source.checkpoint.files.items():
            if key not in inside:
                by_file.setdefault(path, []).append(key)
        tensors: dict[str, Tensor] = {}
        for path, keys in by_file.items():
            tensors.update(read_tensors(path, keys))
        save_tensors(tensors, self._path(len(self.units)))

    def write_unit(self, index: int, name: str, module: nn.Module) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        model = self.source.model
        state = {f"{name}.{k}" if name else k: v for k, v in module.state_dict().items()}
        state = {k: v for k, v in state.items() if k not in self.source.tied}
        model._weight_conversions = self.source.used_conversions()
        save_tensors(revert_weight_conversion(model, state), self._path(index))

    def finish(self, model: nn.Module) -> None:
        """Index, config and the input's other files (tokenizer, generation config, ...); a checkpoint
        only moekit can load is marked so (``mark_moekit_only``)."""
        from .io import needs_moekit_layout

        weight_map, total = {}, 0
        for index in range(self.count):
            sizes = tensor_sizes(self._path(index))
            weight_map.update(dict.fromkeys(sizes, self.shard_name(index)))
            total += sum(sizes.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(self.directory)
        if needs_moekit_layout(model.config):
            mark_moekit_only(self.directory)
        for path in self.source.checkpoint.directory.iterdir():
            own = path.name in ("config.json", INDEX_NAME) or path.name.endswith(WEIGHT_SUFFIXES)
            if path.is_file() and not own and not path.name.startswith("."):
                shutil.copy2(path, self.directory / path.name)
