"""Expert-parallel checkpoints: saved from N ranks, loaded on M ranks (M = 1 included), safetensors only.

Directory layout::

    config.json                      format, model builder + kwargs (optional), saved ep_size, tensor index
    dense.safetensors                every non-expert tensor (routers, embeddings, ...), written by rank 0
    experts-00000-of-00002.safetensors  one file per expert shard (written by the dp_rank 0 replica)

An expert tensor keeps its ``state_dict`` key (e.g. ``blocks.0.experts.up_proj``); each shard file
holds rows ``[start, stop)`` of the global ``[E, ...]`` tensor, and ``config.json`` records which file
holds which global experts. Loading reads only the rows the target rank owns (``safe_open`` slices),
so a checkpoint re-shards onto any expert-parallel size dividing E, or onto a plain ``moekit.MoE``
model. Ranks write into a temporary sibling directory that rank 0 renames into place once every rank
has succeeded: a failed save leaves nothing behind. All ranks must see the same filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._checks import check_finite_tensors, check_tensor_dtypes
from ..checkpoint_format import CONFIG_NAME, check_config_sizes, check_format_version, read_config_json
from ..layers.moe import MoE
from ..registry import MODELS
from ..reporting import check_output_dir, publish_dir, staging_dir
from .comm import guarded
from .groups import ExpertParallelGroups
from .layer import ExpertParallelMoE, expert_parallel

__all__ = ["save_distributed_checkpoint", "load_distributed_state", "load_distributed_model", "read_distributed_config"]

FORMAT = "moekit-expert-parallel"
VERSION = 1
DENSE_NAME = "dense.safetensors"


def _shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-{ep_rank:05d}-of-{ep_size:05d}.safetensors"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (keys without the ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _banks(model: nn.Module) -> dict[str, tuple[nn.Module, int, int, int]]:
    """``state_dict`` prefix of every expert bank -> (bank, global E, first local expert, local count)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            out[f"{name}.experts." if name else "experts."] = (m.experts, m.num_experts, m.expert_offset, m.num_local_experts)
        elif isinstance(m, MoE):
            out[f"{name}.experts." if name else "experts."] = (m.experts, m.num_experts, 0, m.num_experts)
    return out


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int, int, int]]]:
    """Dense tensors, and expert tensors with (global E, start, stop)."""
    banks = _banks(model)
    dense, experts = {}, {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in banks if key.startswith(p)), None)
        if prefix is None:
            dense[key] = value
        else:
            _, E, start, count = banks[prefix]
            experts[key] = (value, E, start, start + count)
    return dense, experts


def _broadcast_text(text: str, groups: ExpertParallelGroups | None) -> str:
    """Rank 0's ``text`` on every rank."""
    if groups is None:
        return text
    data = text.encode()
    n = torch.tensor([len(data)], dtype=torch.long, device=groups.device)
    guarded("broadcast of checkpoint path", groups.world_group, lambda: dist.broadcast(n, 0, group=groups.world_group), groups.timeout_s)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=groups.device)
    if groups.rank == 0:
        buf.copy_(torch.tensor(list(data), dtype=torch.uint8))
    guarded("broadcast of checkpoint path", groups.world_group, lambda: dist.broadcast(buf, 0, group=groups.world_group), groups.timeout_s)
    return bytes(buf.cpu().tolist()).decode()


def _all_ok(ok: bool, groups: ExpertParallelGroups | None) -> bool:
    """Whether every rank reports ``ok``."""
    if groups is None:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.long, device=groups.device)
    guarded("all_reduce of checkpoint status", groups.world_group, lambda: dist.all_reduce(flag, group=groups.world_group), groups.timeout_s)
    return int(flag.item()) == 0


#: the errors of ``check_output_dir``, by name, so that every rank raises rank 0's error
_OUTPUT_ERRORS = {cls.__name__: cls for cls in (ValueError, FileExistsError, NotADirectoryError, PermissionError, OSError)}


def _check_output_on_rank0(
    directory: Path, overwrite: bool, inputs: list[str | os.PathLike[str]], groups: ExpertParallelGroups | None
) -> None:
    """``check_output_dir`` on rank 0, its error raised on every rank."""
    problem = ""
    if groups is None or groups.rank == 0:
        try:
            check_output_dir(directory, overwrite=overwrite, inputs=inputs)
        except tuple(_OUTPUT_ERRORS.values()) as err:
            problem = f"{type(err).__name__}:{err}"
    problem = _broadcast_text(problem, groups)
    if problem:
        kind, message = problem.split(":", 1)
        raise _OUTPUT_ERRORS.get(kind, OSError)(message)


def save_distributed_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    groups: ExpertParallelGroups | None = None,
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Save ``model`` (expert-parallel with ``groups``, or a plain single-process model with
    ``groups=None``) to ``directory``. Collective: every rank of the world must call it.

    Args:
        name, config: the model's builder in ``moekit.registry.MODELS`` and its keyword arguments, so that
            ``load_distributed_model`` can rebuild it; optional (``load_distributed_state`` needs neither).
        overwrite: replace an earlier output of moekit there (never a directory moekit did not write).
        inputs: paths the output must not overlap (``moekit.reporting.check_output_dir``).
    """
    directory, model = Path(directory), _unwrap(model)
    if name is not None:
        MODELS.entry(name)
    rank0 = groups is None or groups.rank == 0
    _check_output_on_rank0(directory, overwrite, list(inputs), groups)
    tmp = ""
    if rank0:
        tmp = str(staging_dir(directory, writer="save_distributed_checkpoint"))
    tmp_dir = Path(_broadcast_text(tmp, groups))
    ep_rank, ep_size = (0, 1) if groups is None else (groups.ep_rank, groups.ep_size)
    dense, experts = _split_state(model)
    error: BaseException | None = None
    try:
        if rank0:
            save_file({k: v.detach().contiguous().cpu() for k, v in dense.items()}, str(tmp_dir / DENSE_NAME))
        if groups is None or groups.dp_rank == 0:
            shard = {k: v.detach().contiguous().cpu() for k, (v, _, _, _) in experts.items()}
            save_file(shard, str(tmp_dir / _shard_name(ep_rank, ep_size)))
    except (OSError, SafetensorError, ValueError) as err:
        error = err
    ok = _all_ok(error is None, groups)
    if ok and rank0:
        index = {}
        for key, (value, E, start, stop) in experts.items():
            count = stop - start
            index[key] = {"num_experts": E, "shape": [E, *value.shape[1:]], "shards": [
                {"file": _shard_name(r, ep_size), "start": r * count, "stop": (r + 1) * count} for r in range(ep_size)]}
        meta = {"format": FORMAT, "version": VERSION, "model": name, "config": None if config is None else dict(config),
                "ep_size": ep_size, "world_size": 1 if groups is None else groups.world_size,
                "dense": DENSE_NAME, "experts": index}
        try:
            (tmp_dir / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            publish_dir(tmp_dir, directory, overwrite=overwrite)
        except (OSError, TypeError, ValueError) as err:
            error, ok = err, False
    ok = _all_ok(ok, groups)
    if not ok:
        if rank0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if error is not None:
            raise error
        raise OSError(f"saving the checkpoint {str(directory)!r} failed on another rank; nothing was written")
    return directory


def read_distributed_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of an expert-parallel checkpoint (checked for its format)."""
    meta = read_config_json(directory)
    path = Path(directory) / CONFIG_NAME
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("experts"), dict):
        raise ValueError(f"{str(path)!r} is not an expert-parallel moekit checkpoint (expected format {FORMAT!r})")
    check_format_version(meta, VERSION, path)
    return meta


def _read_rows(directory: Path, entry: Mapping[str, Any], key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the global expert tensor ``key``, gathered from the shard files."""
    pieces = []
    for shard in entry["shards"]:
        lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
        if lo >= hi:
            continue
        with safe_open(str(directory / shard["file"]), framework="pt") as f:
            pieces.append(f.get_slice(key)[lo - shard["start"] : hi - shard["start"]])
    return torch.cat(pieces)


def load_distributed_state(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint into ``model`` (expert-parallel on any ``ep_size`` dividing E, or a plain
    single-process model), reading only this rank's experts. Strict: every key must match."""
    directory, target = Path(directory), _unwrap(model)
    meta = read_distributed_config(directory)
    dense_path = directory / meta["dense"]
    try:
        with safe_open(str(dense_path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        _, experts = _split_state(target)
        for key, (value, E, start, stop) in experts.items():
            entry = meta["experts"].get(key)
            if entry is None:
                raise ValueError(f"checkpoint {str(directory)!r} has no expert tensor {key!r}")
            if entry["num_experts"] != E:
                raise ValueError(f"{key!r} has num_experts={entry['num_experts']} in the checkpoint but {E} in the model")
            state[key] = _read_rows(directory, entry, key, start, stop)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt or incomplete checkpoint {str(directory)!r}: {err}") from None
    check_tensor_dtypes(state, target.state_dict(), where=str(directory))
    check_finite_tensors(state.items(), where=str(directory))
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(directory)!r} does not match the model: {err}") from None
    return model


def _check_model_size(directory: Path, meta: Mapping[str, Any]) -> None:
    """Refuse a config that would build a model far larger than the weights files hold, before the
    model is built for real: its sizes against the files' tensor extents, then the bytes of a meta-device
    build against the bytes on disk (a dtype may differ: up to 4x is allowed; the strict load checks)."""
    files = [meta["dense"], *sorted({s["file"] for e in meta["experts"].values() for s in e["shards"]})]
    shapes: dict[str, list[int]] = {}
    try:
        for name in files:
            with safe_open(str(directory / name), framework="pt") as f:
                shapes.update({f"{name}:{k}": list(f.get_slice(k).get_shape()) for k in f.keys()})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt or incomplete checkpoint {str(directory)!r}: {err}") from None
    check_config_sizes(meta["config"], shapes, where=str(directory / CONFIG_NAME))
    try:
        with torch.device("meta"):
            skeleton = MODELS.create(meta["model"], **meta["config"])
    except TypeError as err:
        raise ValueError(f"checkpoint config of {str(directory)!r} does not fit {meta['model']!r}: {err}") from None
    except (RuntimeError, OverflowError) as err:
        raise ValueError(f"checkpoint config of {str(directory)!r} cannot be built: {err}") from None
    need = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    have = sum((directory / name).stat().st_size for name in files)
    if need > 4 * have + (1 << 20):
        raise ValueError(
            f"checkpoint config {str(directory / CONFIG_NAME)!r} describes {need:,} bytes of tensors but its weights "
            f"files hold {have:,}: the config does not describe these weights (corrupt or edited config.json)"
        )


def load_distributed_model(directory: str | os.PathLike[str], groups: ExpertParallelGroups | None = None) -> nn.Module:
    """Rebuild the saved model with its ``MODELS`` builder, shard it over ``groups`` (or keep it
    single-process with ``groups=None``) and load the weights."""
    meta = read_distributed_config(directory)
    if meta.get("model") is None or not isinstance(meta.get("config"), dict):
        raise ValueError(f"checkpoint {str(directory)!r} was saved without name=/config=; "
                         "build the model yourself and use load_distributed_state(model, directory)")
    _check_model_size(Path(directory), meta)
    try:
        model = MODELS.create(meta["model"], **meta["config"])
    except TypeError as err:
        raise ValueError(f"checkpoint config of {str(directory)!r} does not fit {meta['model']!r}: {err}") from None
    if groups is not None:
        model = expert_parallel(model, groups)
    return load_distributed_state(model, directory)
