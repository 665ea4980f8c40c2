"""Pass-through to EleutherAI's lm-evaluation-harness (``lm-eval``), when it is installed.

moekit does not depend on lm-eval and never lets it reach the network: the hub and datasets are
switched to offline mode, so tasks must come from local task configs (``include_path``, a directory
of lm-eval task YAMLs whose ``dataset_path`` / ``data_files`` point at local files). The model is
handed over already loaded (``HFLM(pretrained=model, tokenizer=...)``), so moekit's exact and
compressed forms work too. Only Hugging Face models with a tokenizer are supported (lm-eval scores
text through a tokenizer; byte-level moekit LMs use moekit's own tasks).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from .lm import EvalModel

__all__ = ["check_lm_eval", "run_lm_eval"]

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def check_lm_eval(tasks: Sequence[str], include_path: str | os.PathLike[str] | None) -> Path:
    """Fail early (before any model is loaded) when lm-eval or the local task data is missing."""
    if not tasks:
        raise ValueError("--lm-eval needs at least one task name")
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--lm-eval needs the lm-eval package, which is not installed (pip install lm-eval); "
                         "moekit does not depend on it")  # fmt: skip
    if include_path is None:
        raise ValueError("--lm-eval runs offline: give --lm-eval-include DIR, a directory of lm-eval task "
                         "YAMLs whose data are local files")  # fmt: skip
    path = Path(include_path)
    if not path.is_dir():
        raise FileNotFoundError(f"--lm-eval-include {str(path)!r} is not a directory of lm-eval task configs")
    return path


def run_lm_eval(
    model: EvalModel,
    tasks: Sequence[str],
    include_path: str | os.PathLike[str] | None,
    *,
    batch_size: int = 16,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``model``; returns ``{"tasks", "include_path", "version",
    "results"}`` (lm-eval's per-task metric dictionary)."""
    path = check_lm_eval(tasks, include_path)
    if model.kind != "huggingface" or model.tokenizer is None:
        raise ValueError(f"--lm-eval needs a Hugging Face model with a tokenizer; {model.name!r} is not one")
    os.environ.update(OFFLINE)
    lm_eval = importlib.import_module("lm_eval")
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-not-found]
    from lm_eval.tasks import TaskManager  # type: ignore[import-not-found]

    lm = HFLM(pretrained=model.module, tokenizer=model.tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(path))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)
    if out is None:
        raise ValueError(f"lm-eval returned no results for tasks {list(tasks)}")
    return {"tasks": list(tasks), "include_path": str(path), "version": getattr(lm_eval, "__version__", None),
            "results": out.get("results", {})}  # fmt: skip
