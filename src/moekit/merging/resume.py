"""Resumable runs: a run directory beside the output, and pipeline work stored in files.

``RunDirectory(out, settings)`` is where a streamed compression builds its output: the fixed
sibling ``.{out name}.partial/`` (so that a rerun finds it), holding a marker ``.moekit-run.json``
with the run's settings digest. ``resume=True`` continues the run found there (refusing one whose
settings differ); without it an existing run directory is an error that says how to continue or
discard it -- moekit never deletes a directory it cannot prove it wrote (no marker). ``publish``
renames the finished directory to ``out`` (``moekit.reporting.publish_dir``).

``DiskWork`` keeps the pipeline's hidden states (one safetensors file per batch and stage),
per-unit statistics and progress (``progress.json``) under ``{run}/work``; every file is written
under a temporary name and renamed, and progress is recorded only after what it refers to exists,
so a run killed at any instant resumes from the last finished unit with the same inputs -- and,
every step being deterministic, produces the same tensors bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..reporting import as_staging, atomic_write_text, check_output_dir, publish_dir
from .shards import read_tensors, save_tensors
from .work import BlockStats, HiddenStore, Work

__all__ = ["RunDirectory", "DiskWork", "settings_digest"]

MARKER = ".moekit-run.json"
SEP = "|"


def settings_digest(settings: Any) -> str:
    """A digest of everything that determines a run's result (JSON-serialisable settings)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(tensors: list[Tensor]) -> str:
    """A digest of tensors' values (for calibration data in the settings)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class RunDirectory:
    """The partial output of a run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike[str], settings: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.partial"
        self.digest = settings_digest(settings)
        check_output_dir(self.out, overwrite=overwrite)
        marker = self.path / MARKER
        if self.path.exists():
            if not marker.is_file():
                raise FileExistsError(
                    f"{str(self.path)!r} exists but was not made by moekit (no {MARKER}); move it away to run here"
                )
            found = json.loads(marker.read_text()).get("settings")
            if not resume:
                raise FileExistsError(
                    f"an interrupted run left {str(self.path)!r}; rerun the same command with --resume to continue it, "
                    f"or delete that directory to start again"
                )
            if found != self.digest:
                raise ValueError(
                    f"--resume: the run in {str(self.path)!r} was started with other settings or calibration data "
                    f"(digest {found}, this command {self.digest}); rerun its exact command, or delete it to start again"
                )
            self.resumed = True
        else:
            self.path.mkdir(parents=True)
            atomic_write_text(marker, json.dumps({"settings": self.digest, "settings_json": settings}, indent=2, default=str))
            self.resumed = False
        self.work = self.path / "work"

    def discard(self) -> None:
        """Remove the run directory (a fresh run that failed on its input: nothing to resume)."""
        if (self.path / MARKER).is_file():
            shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, overwrite: bool) -> Path:
        """Make the finished directory an ordinary staging directory of ``out`` (a kill from then on
        leaves debris the next run removes; before, the run directory with its marker), drop the work
        files and the run marker, then rename it to ``out``."""
        stage = as_staging(self.path, self.out, writer="compress_checkpoint")
        shutil.rmtree(stage / "work", ignore_errors=True)
        (stage / MARKER).unlink(missing_ok=True)
        return publish_dir(stage, self.out, overwrite=overwrite)


class _DiskHidden(HiddenStore):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, batch: int, value: Any) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"hidden states stored on disk must be tensors, got {type(value).__name__}")
        save_tensors({"hidden": value}, self.directory / f"{batch:05d}.safetensors")

    def get(self, batch: int) -> Tensor:
        path = self.directory / f"{batch:05d}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"run directory lacks {str(path)!r}; it was changed outside moekit -- delete the run")
        return read_tensors(path, ["hidden"])["hidden"]


class DiskWork(Work):
    """Pipeline work under ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _hidden_dir(self, stage: str) -> Path:
        return self.directory / "hidden" / stage.replace("/", "_")

    def hidden(self, stage: str) -> HiddenStore:
        return _DiskHidden(self._hidden_dir(stage))

    def has_hidden(self, stage: str) -> bool:
        return self._hidden_dir(stage).is_dir()

    def drop_hidden(self, stage: str) -> None:
        shutil.rmtree(self._hidden_dir(stage), ignore_errors=True)

    def _stats_path(self, unit: int) -> Path:
        return self.directory / "stats" / f"{unit:05d}.safetensors"

    def save_stats(self, unit: int, stats: BlockStats) -> None:
        flat = {SEP.join((b, s, k)): t for b, per in stats.items() for s, values in per.items() for k, t in values.items()}
        save_tensors(flat, self._stats_path(unit))

    def load_stats(self, unit: int) -> BlockStats:
        out: BlockStats = {}
        for key, t in read_tensors(self._stats_path(unit)).items():
            block, stat, name = key.split(SEP)
            out.setdefault(block, {}).setdefault(stat, {})[name] = t
        return out

    def state(self) -> dict[str, Any] | None:
        path = self.directory / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.directory / "progress.json", json.dumps(state, indent=2, sort_keys=True))
