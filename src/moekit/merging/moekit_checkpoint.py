"""moekit checkpoints (``save_checkpoint`` directories) read and written one module at a time.

``MoekitCheckpointSource`` builds the model from its ``config.json`` on the meta device and loads a
module's tensors from ``model.safetensors`` (``moekit.merging.shards.read_tensors``, strict: every tensor of the module,
nothing else under its name). ``MoekitWriter`` writes each finished unit to its own file and at the
end joins them, with the untouched tensors, into one ``model.safetensors`` by copying bytes
(``moekit.merging.shards.concat_safetensors``, bounded memory), next to a ``config.json`` that describes the compressed
model (expert counts, router outputs and compressed layouts per layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._checks import check_finite_tensors, check_tensor_dtypes, check_tensor_names
from ..checkpoint import CONFIG_NAME, FORMAT, VERSION, WEIGHTS_NAME, check_config_sizes, header_shapes, read_config_json
from ..models.lm import MoELM
from .memory import release_memory
from .pipeline import WeightSource
from .shards import concat_safetensors, read_tensors, save_tensors
from .stack import LayerStack

__all__ = ["MoekitCheckpointSource", "MoekitWriter", "moekit_skeleton"]


class _SkipRandomInit(TorchFunctionMode):
    """Random initialisation of meta tensors is skipped (it has no values to draw, and torch's meta
    kernels for it import torch._dynamo, seconds of start-up)."""

    OPS = frozenset({"normal_", "uniform_", "trunc_normal_", "bernoulli_", "random_", "exponential_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        first = args[0] if args else (kwargs or {}).get("tensor")  # torch.nn.init passes it by keyword
        if getattr(func, "__name__", "") in self.OPS and isinstance(first, Tensor) and first.is_meta:
            return first
        return func(*args, **(kwargs or {}))


def moekit_skeleton(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a moekit checkpoint with every tensor on the meta device, and its ``config.json``."""
    from ..checkpoint import _build, read_checkpoint_config

    meta = read_config_json(directory)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(directory)!r} is not a moekit checkpoint (config.json without format 'moekit')")
    meta = read_checkpoint_config(directory)  # format version, config shape: the errors of load_checkpoint
    weights = Path(directory) / WEIGHTS_NAME
    if weights.is_file():  # a missing file is reported by the weight source
        check_config_sizes(meta.get("config"), header_shapes(weights), where=str(Path(directory) / CONFIG_NAME))
    try:
        with torch.device("meta"), _SkipRandomInit():
            model = _build(directory, meta)
    except (RuntimeError, OverflowError) as err:
        raise ValueError(f"{str(directory)!r}: config.json cannot be built: {err}") from None
    return model.eval(), meta


class MoekitCheckpointSource(WeightSource):
    """Loads modules of ``model`` (from ``moekit_skeleton``) from ``directory/model.safetensors``."""

    def __init__(self, directory: Path, model: nn.Module, against: str = "its config") -> None:
        self.path, self.model = Path(directory) / WEIGHTS_NAME, model
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {WEIGHTS_NAME}")
        found = header_shapes(self.path)  # names and shapes against the config before anything is read
        self.expected = model.state_dict()
        check_tensor_names({k: list(v.shape) for k, v in self.expected.items()}, found, where=str(self.path),
                           against=against)  # fmt: skip
        self.keys = list(found)
        self.loaded: set[str] = set()

    def disk_keys(self, name: str) -> list[str]:
        return [k for k in self.keys if not name or k.startswith(f"{name}.")]

    def unused_keys(self) -> list[str]:
        return sorted(set(self.keys) - self.loaded)

    def load(self, stack: LayerStack, names: Sequence[str]) -> None:
        for name in names:
            keys = self.disk_keys(name)
            prefix = len(name) + 1 if name else 0
            full = read_tensors(self.path, keys)
            check_tensor_dtypes(full, self.expected, where=str(self.path))
            check_finite_tensors(full.items(), where=str(self.path))
            state = {k[prefix:]: t for k, t in full.items()}
            del full
            module = self.model.get_submodule(name) if name else self.model
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as err:
                raise ValueError(f"moekit checkpoint {str(self.path.parent)!r} does not match its config: {err}") from None
            self.loaded.update(keys)

    def release(self, stack: LayerStack, names: Sequence[str]) -> None:
        for name in names:
            (self.model.get_submodule(name) if name else self.model).to("meta")
        release_memory()


class MoekitWriter:
    """Writes the compressed moekit model to ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, source: MoekitCheckpointSource, units: Sequence[str], meta: dict[str, Any]) -> None:
        self.directory, self.source, self.units, self.meta = Path(directory), source, list(units), meta

    def _part(self, index: int) -> Path:
        return self.directory / f".part-{index:05d}.safetensors"

    def write_trunk(self) -> None:
        inside = {k for u in self.units for k in self.source.disk_keys(u)}
        tensors = read_tensors(self.source.path, [k for k in self.source.keys if k not in inside])
        save_tensors(tensors, self._part(len(self.units)))

    def write_unit(self, index: int, name: str, module: nn.Module) -> None:
        save_tensors({f"{name}.{k}": v for k, v in module.state_dict().items()}, self._part(index))

    def finish(self, model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
        parts = [self._part(i) for i in range(len(self.units) + 1)]
        weights = self.directory / WEIGHTS_NAME
        # the weights appear (by a rename) before any part is removed: a part missing on a resume means
        # a killed earlier finish had already written them whole
        if all(p.is_file() for p in parts) or not weights.is_file():
            concat_safetensors(parts, weights)
        for part in parts:
            part.unlink(missing_ok=True)
        config = dict(self.meta.get("config", {}))
        if callable(getattr(model, "config", None)):
            config.update(model.config())
        if isinstance(model, MoELM):  # layers reduced before a resume are known from the record only
            for i in range(len(model.blocks)):
                layer = layers.get(f"blocks.{i}.moe")
                if layer is not None:
                    config["experts_per_layer"][i] = layer["experts"]
                    config["router_outputs_per_layer"][i] = layer["router_outputs"]
        text = json.dumps({"format": FORMAT, "version": VERSION, "model": self.meta["model"], "config": config}, indent=2)
        (self.directory / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
