"""Compress a checkpoint larger than memory: the pipeline streamed unit by unit from disk.

``compress_checkpoint(src, out, batches, spec)`` opens ``src`` lazily (a moekit checkpoint or a
Hugging Face model directory of a registered family), builds the model as an empty skeleton on the
meta device, and runs ``moekit.merging.pipeline`` with

* a ``WeightSource`` that reads one unit's tensors from the safetensors files when the unit is
  processed and frees them after (decoder layers; an encoder-decoder model is one unit, so it must
  fit in memory);
* ``DiskWork``: hidden states, statistics and progress as files in the run directory (one batch
  resident at a time; the page cache, not the process, holds the rest);
* a writer that puts each finished unit into the output shards at once.

Memory: ``max_memory`` (default: half of the memory the kernel reports as available) is checked
against a plan (``moekit.merging.budget``): before anything is read, from the memory now and the
largest unit's bytes; after the input check, with the activations measured on the first unit and the
largest calibration batch; and before every unit, from what the units before it took.

The run directory (``moekit.merging.resume.RunDirectory``) becomes ``out`` only when everything is
written and checked: the writer's output is opened again like a loader would (every tensor of the
output model present with its shape, nothing extra, no NaN/Inf) and run on a few calibration tokens,
whose logits must match the ones the pipeline computed in memory. ``resume=True`` continues an
interrupted run bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..checkpoint import read_config_json
from ..reporting import check_output_dir, write_json
from .budget import BudgetedSource, LiveTensorBytes, MemoryPlan, storage_bytes
from .memory import available_bytes, peak_rss_bytes, release_memory
from .observer import unwrap_batch
from .pipeline import CompressionSpec, check_request, run_pipeline
from .resume import DiskWork, RunDirectory, tensor_digest
from .shards import tensor_sizes
from .stack import LayerStack

__all__ = ["compress_checkpoint", "open_checkpoint", "Opened", "ModelKind", "opened", "stream_logits", "check_output",
           "REPORT_NAME"]  # fmt: skip

REPORT_NAME = "compress_report.json"


@dataclass
class Opened:
    """A checkpoint opened for streaming: its layer stack (on a meta skeleton), the source of its
    tensors, and the bytes of each unit's tensors (``unit_bytes``) and of the rest (``other_bytes``)."""

    kind: str
    directory: Path
    stack: LayerStack
    source: Any
    unit_bytes: list[int]
    other_bytes: int
    meta: dict[str, Any]

    def writer(self, directory: Path) -> Any:
        if self.kind == "moekit":
            from .moekit_checkpoint import MoekitWriter

            return MoekitWriter(directory, self.source, self.stack.units(), self.meta)
        return _kind(self.kind).writer(directory, self.source, self.stack.units())

    def finish(self, writer: Any, report: dict[str, Any]) -> None:
        if self.kind == "moekit":
            writer.finish(self.stack.model, report["layers"])
        else:
            writer.finish(self.stack.model)


def open_checkpoint(directory: str | Path) -> Opened:
    """Open ``directory`` (moekit checkpoint or Hugging Face model directory) for streaming."""
    directory = Path(directory)
    meta = read_config_json(directory, what="input")
    if not isinstance(meta, dict) or (meta.get("format") != "moekit" and "model_type" not in meta):
        raise ValueError(f"{str(directory / 'config.json')!r} is neither a moekit checkpoint config nor a Hugging Face model config")
    if meta.get("format") == "moekit":
        return _open_moekit(directory)
    return _kind("huggingface").open(directory, meta)


class ModelKind(Protocol):
    """A kind of model outside moekit's own (registered in ``moekit.registry.MODEL_KINDS``): how to
    stack one in memory, open one for streaming and write its output shards."""

    def stack(self, model: nn.Module, forward: Any = None) -> LayerStack: ...

    def open(self, directory: Path, meta: dict[str, Any]) -> Opened: ...

    def writer(self, directory: Path, source: Any, units: Sequence[str]) -> Any: ...


def _kind(name: str) -> ModelKind:
    from ..registry import MODEL_KINDS

    return MODEL_KINDS.get(name)


def _open_moekit(directory: Path) -> Opened:
    from .moekit_checkpoint import MoekitCheckpointSource, moekit_skeleton
    from .pipeline import moekit_stack

    model, meta = moekit_skeleton(directory)
    source = MoekitCheckpointSource(directory, model, against=f"its config ({meta.get('model')!r})")
    return opened("moekit", directory, moekit_stack(model), source, tensor_sizes(source.path), meta)


def opened(kind: str, directory: Path, stack: LayerStack, source: Any, sizes: dict[str, int], meta: dict[str, Any]) -> Opened:
    """An ``Opened`` checkpoint; ``sizes``: bytes of every tensor on disk, split into units and the rest."""
    units = stack.units()
    unit_bytes = [sum(sizes[k] for k in source.disk_keys(u)) for u in units]
    return Opened(kind, directory, stack, source, unit_bytes, sum(sizes.values()) - sum(unit_bytes), meta)


def check_input(opened: Opened, probe: Any = None) -> tuple[int, int]:
    """Read the whole input once, one module at a time (within the memory bound), through the loader
    the run uses: missing, mismatched, unexpected, wrongly typed and NaN/inf tensors are errors before
    any output exists. With a ``probe`` batch, the first unit runs on its first row: returns ``(peak
    bytes of the activations, bytes of the context)`` for the whole batch (``LiveTensorBytes``,
    ``storage_bytes``, times the rows: both grow linearly with them), else (0, 0)."""
    from .._checks import raise_for_tensor_problems

    stack, source = opened.stack, opened.source
    context_names = stack.context_modules()
    names = [n for n in dict.fromkeys([*stack.units(), *stack.head_modules()]) if n not in set(context_names)]
    activations = contexts = 0
    rows = _rows(probe) if probe is not None else 0
    probe = _first_rows(probe, 1) if probe is not None else None  # one row: the measurement stays small
    source.load(stack, context_names)
    with torch.no_grad():
        hidden, context = stack.prepare(probe) if probe is not None else (None, None)
    source.release(stack, context_names)
    for name in names:
        source.load(stack, [name])
        if probe is not None and name == stack.units()[0]:
            with torch.no_grad(), LiveTensorBytes() as meter:
                out = stack.run(0, hidden, context)
            activations = meter.peak + storage_bytes([hidden, out])
            contexts = storage_bytes([context, probe]) - storage_bytes([probe])
            del out
        source.release(stack, [name])
    raise_for_tensor_problems(unexpected=source.unused_keys(), where=str(opened.directory))
    source.loaded.clear()
    release_memory()
    return activations * rows, max(0, contexts) * rows


def _input_ids(batch: Any) -> Any:
    """A calibration batch's token ids (the tensor itself, or a dict's ``input_ids``)."""
    return batch.get("input_ids") if isinstance(batch, dict) else batch


def _rows(batch: Any) -> int:
    ids = _input_ids(batch)
    return int(ids.shape[0]) if isinstance(ids, Tensor) and ids.dim() > 0 else 1


def memory_plan(opened: Opened, max_memory: int | None) -> MemoryPlan:
    """The run's memory plan (``moekit.merging.budget``), checked on the weights alone."""
    budget = max_memory if max_memory is not None else int(0.5 * (available_bytes() or 8 * 2**30))
    sizes = dict(zip(opened.stack.units(), opened.unit_bytes))
    plan = MemoryPlan(budget, {**sizes, "(other modules)": opened.other_bytes}, str(opened.directory))
    plan.check()
    return plan


def _largest_batch(batches: Sequence[Any]) -> Any:
    """The batch with the most token ids (the first of equal ones)."""
    def tokens(batch: Any) -> int:
        ids = _input_ids(batch)
        return ids.numel() if isinstance(ids, Tensor) else 0

    return max(batches, key=tokens)


def _first_rows(batch: Any, rows: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[:rows]
    if isinstance(batch, dict):
        return {k: v[:rows] for k, v in batch.items()}
    raise TypeError(f"a calibration batch must be a tensor or a dict of tensors, got {type(batch).__name__}")


@torch.no_grad()
def stream_logits(opened: Opened, batch: Any) -> Tensor:
    """The checkpoint's logits on ``batch``, loading one unit at a time."""
    stack, source = opened.stack, opened.source
    source.load(stack, stack.context_modules())
    hidden, context = stack.prepare(batch)
    source.release(stack, stack.context_modules())
    for i, name in enumerate(stack.units()):
        source.load(stack, [name])
        hidden = stack.run(i, hidden, context)
        source.release(stack, [name])
    source.load(stack, stack.head_modules())
    logits = stack.logits(hidden, context).float().clone()
    source.release(stack, stack.head_modules())
    return logits


def check_output(directory: Path, batch: Any, expected: Tensor) -> dict[str, Any]:
    """Open the written checkpoint as a loader would, run it on ``batch`` and compare with ``expected``."""
    opened = open_checkpoint(directory)
    logits = stream_logits(opened, batch)
    unused = opened.source.unused_keys()
    if unused:
        raise ValueError(f"the written checkpoint holds tensors its model does not use: {unused[:8]}")
    if logits.shape != expected.shape:
        raise ValueError(f"the written checkpoint gives logits {tuple(logits.shape)}, expected {tuple(expected.shape)}")
    diff = float((logits - expected).abs().max()) if logits.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not diff <= 1e-4 * (1.0 + scale):
        raise ValueError(f"the written checkpoint's logits differ from the compressed model's by {diff:.3g}")
    return {"max_abs_logit_diff": diff, "tokens": int(expected.shape[0] * expected.shape[1]) if expected.dim() > 2 else int(expected.shape[0])}


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def compress_checkpoint(
    src: str | Path,
    out: str | Path,
    batches: Sequence[Any],
    spec: CompressionSpec,
    *,
    max_memory: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    verify_rows: int = 2,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress the checkpoint ``src`` into ``out``, streamed (see the module docstring).

    Args:
        src: moekit checkpoint or Hugging Face model directory (only read).
        out: output directory: absent or empty unless ``overwrite`` (which replaces only an earlier output
            of moekit), never overlapping ``src`` (``moekit.reporting.check_output_dir``).
        batches: calibration batches (token ids ``[B, S]``, or dicts with ``input_ids`` / ``attention_mask``).
        spec: what to do (``CompressionSpec``).
        max_memory: bound on the process's resident memory in bytes (``moekit.merging.budget``).
        resume: continue an interrupted run of the same command.
        verify_rows: calibration rows whose logits check the written output.
        settings: other settings that determine the result (recorded, and compared on resume).

    Returns the report (also written to ``out/compress_report.json``).
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    check_output_dir(out, overwrite=overwrite, inputs=[src], name="out")
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches given")
    opened = open_checkpoint(src)
    check_request(opened.stack, spec)
    plan = memory_plan(opened, max_memory)
    plain = [unwrap_batch(b) for b in batches]
    activations, context = check_input(opened, _largest_batch([b for b, _ in plain]))
    plan.add_activations(activations, context * len(plain))
    tensors = [t for batch, _ in plain for t in (batch.values() if isinstance(batch, dict) else [batch])]
    tensors += [torch.tensor([w for _, w in plain], dtype=torch.float64)] if any(w != 1.0 for _, w in plain) else []
    run_settings = {"input": str(src.resolve()), "spec": spec.as_dict(), "calibration": tensor_digest(tensors), **(settings or {})}
    run_dir = RunDirectory(out, run_settings, resume=resume, overwrite=overwrite)
    try:
        writer = opened.writer(run_dir.path)
        verify = _first_rows(plain[0][0], verify_rows)
        source = BudgetedSource(opened.source, plan, opened.stack.units())
        report = run_pipeline(opened.stack, batches, spec, source=source, work=DiskWork(run_dir.work),
                              writer=writer, verify=verify, quiet=quiet)  # fmt: skip
        opened.finish(writer, report)
        check = check_output(run_dir.path, verify, report.pop("expected_logits"))
        plan.check_peak("the output was checked")  # a result appears only if the whole run kept the bound
        result = {
            "input": str(src), "output": str(out), "kind": opened.kind, **spec.as_dict(),
            "layers": report["layers"], "experts_per_block": report["counts"], "padding_bytes": report["padding_bytes"],
            "unit_seconds": report["unit_seconds"], "kept": report["kept"], "protected_super_experts": report["protected"],
            "resumed": run_dir.resumed,
            "weights_bytes_before": _weights_bytes(src), "weights_bytes_after": _weights_bytes(run_dir.path),
            "verification": check, "memory": {**plan.as_dict(), "peak_rss": peak_rss_bytes()},
            "seconds": round(time.perf_counter() - start, 3), **(settings or {}),
        }  # fmt: skip
        write_json(run_dir.path / REPORT_NAME, result)
    except (ValueError, TypeError, FloatingPointError):  # the input is at fault: rerunning cannot resume it
        if not run_dir.resumed:
            run_dir.discard()
        raise
    run_dir.publish(overwrite)
    return json.loads((out / REPORT_NAME).read_text())
