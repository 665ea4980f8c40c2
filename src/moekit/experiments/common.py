"""What every experiment's ``results.json`` records, and the pinned execution it runs under.

Layout shared by all experiments (``results_header`` fills the first part)::

    {"experiment": "smear", "paper": URL, "smoke_run": false,
     "command": "moekit reproduce smear --seeds 0,1,2,3,4",   # null when run from Python
     "config": {...},                                           # the config dataclass, threads included
     "environment": {...versions, platform, torch_threads, cpus},
     ...the experiment's own data (runs, trials, ...)...,
     "timing": {...}}                                           # wall-clock seconds, and nothing else

Everything outside ``"timing"`` is a function of the config (and the machine's library versions): the
same command with the same seeds and thread count writes the same JSON (tests compare two runs with
``without_timing``).

Experiments also save models for ``moekit analyze DIR --run NAME``: runs with a ``"name"`` and a
``"checkpoint"`` (``checkpoints/<name>``, written by ``save_run_models``) and the data they were
tested on, ``"eval_set"`` (an ``EvalSet`` file; at the top of the JSON or per run).
"""

from __future__ import annotations

import importlib.metadata
import os
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from .._checks import check_int
from ..progress import Progress
from ..reporting import check_output_dir, environment

__all__ = ["TIMING_KEY", "start_run", "versions", "results_header", "without_timing", "pinned_threads", "config_dict",
           "run_slug", "checkpoint_entry", "save_run_models"]  # fmt: skip

#: the one key of a results JSON that holds wall-clock measurements (excluded from rerun comparisons)
TIMING_KEY = "timing"

_PACKAGES = ("moekit", "torch", "numpy", "scipy", "scikit-learn", "matplotlib")


def start_run(cfg: Any, out_dir: str | Path | None, *, overwrite: bool, progress: Progress | None,
              inputs: Iterable[str | Path] = ()) -> Progress:  # fmt: skip
    """The checks before any work (``cfg.check()``, and ``out_dir`` is free unless ``overwrite`` and overlaps
    none of the ``inputs``); returns the progress to report to (``Progress.off()`` when none is given)."""
    cfg.check()
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite, inputs=inputs, name="out_dir")
    return progress or Progress.off()


def versions() -> dict[str, str | None]:
    """Installed versions of the packages an experiment's numbers depend on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples become lists)."""
    if not is_dataclass(cfg):
        raise TypeError(f"cfg must be a config dataclass, got {type(cfg).__name__}")

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(asdict(cfg))  # type: ignore[arg-type]


def results_header(
    experiment: str, paper: str, cfg: Any, *, command: str | None, smoke_run: bool
) -> dict[str, Any]:
    """The first keys of a results JSON: what ran, from which command, under which environment."""
    return {
        "experiment": experiment,
        "paper": paper,
        "smoke_run": bool(smoke_run),
        "command": command,
        "config": config_dict(cfg),
        "environment": {**environment(), "cpus": os.cpu_count(), "versions": versions()},
    }


def without_timing(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without its wall-clock part: what two runs of one command must share exactly."""
    return {k: v for k, v in results.items() if k != TIMING_KEY}


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads and at most ``threads`` BLAS / OpenMP threads in
    numpy, scipy and scikit-learn (t-SNE, bootstrap); the previous counts are restored after. Single
    runs move by about a point between thread counts, so every experiment pins (and records) it."""
    from threadpoolctl import threadpool_limits

    check_int("threads", threads, low=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


def run_slug(label: str) -> str:
    """A run label as a directory name: ``"top-2 + aux-free bias"`` -> ``"top-2-aux-free-bias"``."""
    return "-".join("".join(c if c.isalnum() or c in "-_." else " " for c in label.lower()).split())


def checkpoint_entry(name: str) -> str:
    """Where run ``name``'s model lies in an experiment directory (the results' ``"checkpoint"``)."""
    return f"checkpoints/{name}"


def save_run_models(out: Path, models: Mapping[str, Any], eval_sets: Mapping[str, Any] | None = None) -> None:
    """Save each run's model to ``out / checkpoint_entry(name)`` (a model, or ``(model, builder name,
    builder config)`` for models built from ready-made parts) and each ``EvalSet`` to ``out / file``."""
    from ..checkpoint import write_checkpoint

    for name, model in models.items():
        model, builder, config = model if isinstance(model, tuple) else (model, None, None)
        path = out / checkpoint_entry(name)
        path.mkdir(parents=True)
        write_checkpoint(model, path, name=builder, config=config)
    for file, data in (eval_sets or {}).items():
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        data.save(out / file)
