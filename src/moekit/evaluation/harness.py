"""``evaluate``: every task on one model (and its reference), on one set of held-out documents.

The items and prompts are built from the text and the seed before any model runs, so the model and
its reference -- and any later run with the same data, seed and settings -- answer the same
questions; ``compare`` pairs them. With a reference, the reference also gets perplexity and the
multiple-choice tasks, and the result carries the paired differences (model minus reference).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from .. import __version__
from .._checks import check_int
from ..reporting import environment
from .choice import ChoiceItem, build_choice_items, evaluate_items
from .cloze import build_cloze_items
from .compare import compare_runs
from .documents import EvalData, load_data
from .generate import Prompt, build_prompts, evaluate_generation
from .lm import EvalModel, load_model, wrap_model
from .perplexity import evaluate_perplexity

__all__ = ["TASKS", "FORMAT", "VERSION", "EvalSettings", "evaluate", "as_eval_model"]

TASKS = ("perplexity", "choice", "cloze", "generate")
FORMAT = "moekit-eval"
VERSION = 1


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides what is evaluated (recorded in the JSON).

    Attributes:
        seed: item, prompt and bootstrap seed.
        documents: evaluate only the first N documents (None: all).
        max_doc_bytes: perplexity scores at most this many bytes of each document (None: all).
        stride: perplexity window stride in tokens (None: the model's context, i.e. disjoint windows).
        items: multiple-choice items per task (choice, cloze).
        distractors: wrong choices per item (chance = 1 / (distractors + 1)).
        context_bytes: text before the blank of an item (cut further to fit the model).
        max_choice_bytes: next-line choices are cut to this many bytes.
        suffix_bytes: cloze text after the blank, scored with every choice.
        prompts, prompt_length, new_tokens: generation prompts, their length (bytes of text, or tokens
            for token-id documents) and the greedy continuation length in tokens.
        ngram: n of the repeated-n-gram rate.
        batch_size: rows per forward.
        level, n_resamples: confidence level and bootstrap resamples of every interval.
    """

    seed: int = 0
    documents: int | None = None
    max_doc_bytes: int | None = None
    stride: int | None = None
    items: int = 500
    distractors: int = 3
    context_bytes: int = 256
    max_choice_bytes: int = 40
    suffix_bytes: int = 24
    prompts: int = 32
    prompt_length: int = 64
    new_tokens: int = 32
    ngram: int = 4
    batch_size: int = 16
    level: float = 0.95
    n_resamples: int = 4999

    def __post_init__(self) -> None:
        for name in ("items", "distractors", "prompts", "prompt_length", "new_tokens", "ngram", "batch_size",
                     "max_choice_bytes", "suffix_bytes", "n_resamples"):  # fmt: skip
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        for name in ("documents", "max_doc_bytes", "stride"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)

    def stats(self) -> dict[str, Any]:
        return {"level": self.level, "n_resamples": self.n_resamples, "seed": self.seed}


def as_eval_model(model: EvalModel | nn.Module | str | os.PathLike[str], **kwargs: Any) -> EvalModel:
    """An ``EvalModel`` from a model directory, a module, or an ``EvalModel`` (returned as is)."""
    if isinstance(model, EvalModel):
        return model
    if isinstance(model, nn.Module):
        return wrap_model(model, **kwargs)
    return load_model(model, **kwargs)


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    return tasks


def _check_text(model: EvalModel, data: EvalData, role: str) -> None:
    if not model.byte_level and model.tokenizer is None and any(d.text is not None for d in data.documents):
        raise ValueError(
            f"the {role} {model.name!r} has no tokenizer, so it cannot score text data; save its tokenizer "
            "in the model directory, or give token-id files (.safetensors / .jsonl with input_ids)"
        )


def _versions() -> dict[str, Any]:
    tf = sys.modules.get("transformers")
    return {"moekit": __version__, "transformers": getattr(tf, "__version__", None)}


def evaluate(
    model: EvalModel | nn.Module | str | os.PathLike[str],
    data: EvalData | str | Sequence[str] = "stdlib",
    *,
    tasks: Sequence[str] = TASKS,
    reference: EvalModel | nn.Module | str | os.PathLike[str] | None = None,
    settings: EvalSettings = EvalSettings(),
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (and ``reference``) on ``tasks``; returns the JSON-ready result.

    Args:
        model, reference: model directories (moekit checkpoint or Hugging Face), modules, or
            ``EvalModel``. ``generate`` compares the model with the reference (repetition only without).
        data: ``"stdlib"`` (held-out stdlib files), file paths, or ``EvalData``.
        tasks: any of ``TASKS``.
        progress: progress bars on a terminal.
        command: the command line, recorded.

    Returns ``{"format", "version", "command", "environment", "data", "settings", "tasks",
    "runs": [{"name", "role", "model", "tasks": {task: result}}], "comparisons", "items"}``.
    """
    tasks = _check_tasks(tasks)
    data = load_data(data).head(settings.documents)
    model = as_eval_model(model)
    ref = as_eval_model(reference) if reference is not None else None
    for m, role in ((model, "model"), (ref, "reference")):
        if m is not None and tasks:
            _check_text(m, data, role)
    s, stats = settings, settings.stats()
    items: dict[str, list[ChoiceItem]] = {}
    if "choice" in tasks:
        items["choice"] = build_choice_items(data, items=s.items, distractors=s.distractors, seed=s.seed,
                                             context_bytes=s.context_bytes, max_choice_bytes=s.max_choice_bytes)  # fmt: skip
    if "cloze" in tasks:
        items["cloze"] = build_cloze_items(data, items=s.items, distractors=s.distractors, seed=s.seed,
                                           context_bytes=s.context_bytes, suffix_bytes=s.suffix_bytes)  # fmt: skip
    prompts: list[Prompt] = []
    if "generate" in tasks:
        prompts = build_prompts(data, prompts=s.prompts, prompt_length=s.prompt_length, new_tokens=s.new_tokens,
                                seed=s.seed)  # fmt: skip

    def run(m: EvalModel, with_reference: EvalModel | None, generate: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "perplexity" in tasks:
            out["perplexity"] = evaluate_perplexity(m, data, stride=s.stride, max_doc_bytes=s.max_doc_bytes,
                                                    batch_size=s.batch_size, progress=progress, **stats)  # fmt: skip
        for task, task_items in items.items():
            own = {"max_choice_bytes": s.max_choice_bytes} if task == "choice" else {"suffix_bytes": s.suffix_bytes}
            item_settings = {"items": s.items, "distractors": s.distractors, "context_bytes": s.context_bytes, **own}
            out[task] = evaluate_items(m, task_items, data, settings=item_settings, batch_size=s.batch_size,
                                       progress=progress, **stats)  # fmt: skip
        if generate:
            out["generate"] = evaluate_generation(m, prompts, data, reference=with_reference, new_tokens=s.new_tokens,
                                                  ngram=s.ngram, batch_size=s.batch_size, progress=progress, **stats)  # fmt: skip
        return out

    runs = [{"name": model.name, "role": "model", "model": _describe(model), "tasks": run(model, ref, bool(prompts))}]
    comparisons: list[dict[str, Any]] = []
    if ref is not None:
        name = ref.name if ref.name != model.name else f"{ref.name} (reference)"
        runs.append({"name": name, "role": "reference", "model": _describe(ref), "tasks": run(ref, None, False)})
        comparisons = compare_runs(runs[0], runs[1], **stats)
    return {
        "format": FORMAT, "version": VERSION, "command": list(command) if command is not None else None,
        "environment": {**environment(), **_versions()}, "data": data.describe(), "settings": asdict(settings),
        "tasks": tasks, "runs": runs, "comparisons": comparisons,
        "items": {**{t: [it.to_dict() for it in v] for t, v in items.items()},
                  **({"generate": [_prompt_dict(p) for p in prompts]} if prompts else {})},
    }  # fmt: skip


def _describe(model: EvalModel) -> dict[str, Any]:
    return {"name": model.name, "byte_level": model.byte_level, "vocab_size": model.vocab_size,
            "context": model.context, **model.info}  # fmt: skip


def _prompt_dict(p: Prompt) -> dict[str, Any]:
    def text(x: bytes | tuple[int, ...]) -> Any:
        return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else list(x)

    return {"id": p.id, "document": p.document, "offset": p.offset, "prompt": text(p.prompt),
            "continuation": text(p.continuation)}  # fmt: skip
