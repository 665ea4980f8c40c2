"""Multiple-choice log-likelihood tasks built from text: next-line completion (``choice``), and the
scoring shared with ``cloze``.

Next-line item: a position at the start of a line of a document; the context is up to
``context_bytes`` of the document before it, including the line's indentation (the same for every
choice, so indentation is no clue); the true continuation is the rest of the line, cut to at most
``max_choice_bytes`` at a space ("next span" for long lines); the ``distractors`` wrong choices are
lines (cut the same way) drawn from *other* documents of the same data, of the same length in bytes
(widened to 0.8-1.25x, then 0.5-2x, only when too few exist), all distinct from the truth and from
each other. With equal lengths, length alone tells nothing, and ``acc_norm`` equals ``acc``.

Scoring (lm-eval's ``acc`` / ``acc_norm``): ``loglik = log p(choice + suffix | context)`` (suffix is
empty here; cloze scores the text after the blank too); ``acc`` picks the largest loglik,
``acc_norm`` the largest loglik per byte of ``choice + suffix``; ties go to the first choice.
Context that does not fit the model is cut from the left. Items depend only on the text and the seed,
never on a model, so every model answers the same items and results can be compared pairwise.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .._checks import check_int
from .documents import EvalData, char_start, round_robin
from .lm import EvalModel
from .metrics import summarise
from .scoring import progress_bar, target_logprobs

__all__ = ["ChoiceItem", "build_choice_items", "score_items", "evaluate_items", "items_digest"]

MIN_CONTEXT_BYTES = 32
#: (low, high) ratios to the true choice's length tried in turn when drawing distractors: equal
#: length first, so that length alone tells nothing (a scorer that prefers short or long text is at
#: chance under both acc and acc_norm)
LENGTH_WINDOWS = ((1.0, 1.0), (0.8, 1.25), (0.5, 2.0), (0.0, float("inf")))


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: ``context`` followed by one of ``choices`` (then ``suffix``)."""

    id: str
    task: str
    document: str
    offset: int
    context: bytes
    choices: tuple[bytes, ...]
    answer: int
    suffix: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        text = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
        return {"id": self.id, "task": self.task, "document": self.document, "offset": self.offset,
                "context": text(self.context), "choices": [text(c) for c in self.choices],
                "answer": self.answer, "suffix": text(self.suffix)}  # fmt: skip


def items_digest(items: Sequence[ChoiceItem]) -> str:
    """SHA-256 of the items' exact bytes (two results answer the same items iff these agree)."""
    h = hashlib.sha256()
    for it in items:
        head = json.dumps([it.id, it.task, it.document, it.offset, it.answer]).encode()
        h.update(head + b"\0" + it.context + b"\0" + b"\1".join(it.choices) + b"\0" + it.suffix + b"\0")
    return h.hexdigest()


def clip(span: bytes, max_bytes: int) -> bytes:
    """``span`` cut to at most ``max_bytes``: at the last space when one lies past the middle, else at a
    character boundary."""
    if len(span) <= max_bytes:
        return span
    space = span.rfind(b" ", 0, max_bytes + 1)
    if space > max_bytes // 2:
        return span[:space]
    end = max_bytes
    while end > 0 and (span[end] & 0xC0) == 0x80:
        end -= 1
    return span[:end]


@dataclass(frozen=True)
class Candidate:
    """A place where an item can be asked: the blank starts at ``offset`` with true text ``truth``."""

    doc: int
    offset: int
    truth: bytes
    suffix: bytes = b""


class DistractorPool:
    """Texts by document, indexed by length, to draw length-matched wrong choices from other documents."""

    def __init__(self, entries: Sequence[tuple[int, bytes]]) -> None:
        by_length: dict[int, dict[bytes, set[int]]] = {}
        for doc, text in entries:
            by_length.setdefault(len(text), {}).setdefault(text, set()).add(doc)
        self.by_length = by_length
        self.lengths = np.array(sorted(by_length))

    def draw(self, truth: bytes, doc: int, k: int, rng: np.random.Generator) -> list[bytes] | None:
        """``k`` distinct texts != ``truth`` that occur in a document other than ``doc``, of the length of
        ``truth`` or as close as ``LENGTH_WINDOWS`` allows; None when fewer than ``k`` exist."""
        n = len(truth)
        for low, high in LENGTH_WINDOWS:
            lengths = self.lengths[(self.lengths >= low * n) & (self.lengths <= high * n)]
            options = [
                text for length in lengths.tolist() for text, docs in self.by_length[length].items()
                if text != truth and docs != {doc}
            ]  # fmt: skip
            if len(options) >= k:
                return [options[i] for i in rng.choice(len(options), size=k, replace=False).tolist()]
        return None


def sample_items(
    task: str,
    data: EvalData,
    candidates: Sequence[Sequence[Candidate]],
    pool: DistractorPool,
    *,
    context_bytes: int,
    items: int,
    distractors: int,
    seed: int,
) -> list[ChoiceItem]:
    """Up to ``items`` items, taking candidates from the documents in turn (``round_robin``), so items
    spread over documents; an item's context is the ``context_bytes`` of its document before the
    blank. Deterministic for a given ``seed``."""
    check_int("items", items, low=1)
    check_int("distractors", distractors, low=1)
    if len(data.documents) < 2:
        raise ValueError(f"{task} items need at least 2 documents (distractors come from other documents)")
    rng = np.random.default_rng(seed)
    out: list[ChoiceItem] = []
    for cand in round_robin(candidates, rng):
        if len(out) == items:
            break
        wrong = pool.draw(cand.truth, cand.doc, distractors, rng)
        if wrong is not None:
            answer = int(rng.integers(distractors + 1))
            choices = tuple(wrong[:answer] + [cand.truth] + wrong[answer:])
            doc = data.documents[cand.doc]
            context = doc.text[char_start(doc.text, max(0, cand.offset - context_bytes)) : cand.offset]
            out.append(ChoiceItem(f"{task}-{len(out)}", task, doc.id, cand.offset, context, choices, answer, cand.suffix))
    if not out:
        raise ValueError(f"the data gives no {task} item (documents too short, or too few distractors)")
    return out


def build_choice_items(
    data: EvalData,
    *,
    items: int = 500,
    distractors: int = 3,
    seed: int = 0,
    context_bytes: int = 256,
    max_choice_bytes: int = 40,
    min_choice_bytes: int = 8,
) -> list[ChoiceItem]:
    """Next-line completion items (see the module docstring); needs text documents."""
    if not data.has_text:
        raise ValueError("choice items need text documents; token-id files support perplexity and generate only")
    check_int("max_choice_bytes", max_choice_bytes, low=1)
    check_int("min_choice_bytes", min_choice_bytes, low=1, high=max_choice_bytes)
    check_int("context_bytes", context_bytes, low=MIN_CONTEXT_BYTES)
    candidates: list[list[Candidate]] = []
    entries: list[tuple[int, bytes]] = []
    for d, doc in enumerate(data.documents):
        found, start = [], 0
        for line in doc.text.split(b"\n"):
            content = line.lstrip(b" \t")
            indent = start + len(line) - len(content)
            span = clip(content.rstrip(b"\r"), max_choice_bytes)
            if len(span.strip()) >= min_choice_bytes:
                entries.append((d, span))
                if indent >= MIN_CONTEXT_BYTES:
                    found.append(Candidate(d, indent, span))
            start += len(line) + 1
        candidates.append(found)
    return sample_items("choice", data, candidates, DistractorPool(entries), context_bytes=context_bytes,
                        items=items, distractors=distractors, seed=seed)  # fmt: skip


def score_items(
    model: EvalModel, items: Sequence[ChoiceItem], *, batch_size: int = 16, progress: bool = False
) -> list[dict[str, Any]]:
    """One record per item: the loglik, bytes and tokens of each choice (+ suffix), the answer, and
    whether ``acc`` / ``acc_norm`` pick it (``correct`` / ``correct_norm``, 0 or 1)."""
    rows, spans = [], []
    for it in items:
        for choice in it.choices:
            ctx, cont = model.encode_pair(it.context, choice + it.suffix)
            if len(cont) > model.context:
                raise ValueError(
                    f"item {it.id}: a choice of {len(cont)} tokens does not fit the context of {model.name!r} "
                    f"({model.context}); use shorter choices"
                )
            keep = max(1, model.context + 1 - len(cont))  # context cut from the left to fit
            rows.append(ctx[-keep:] + cont)
            spans.append(len(cont))
    with progress_bar(len(rows), f"{items[0].task if items else 'items'} {model.name}", progress) as bar:
        scores = target_logprobs(model, rows, batch_size=batch_size, bar=bar)
    out, r = [], 0
    for it in items:
        k = len(it.choices)
        loglik = [float(scores[r + j][-spans[r + j] :].sum()) for j in range(k)]
        nbytes = [len(c) + len(it.suffix) for c in it.choices]
        tokens = spans[r : r + k]
        r += k
        best = int(np.argmax(loglik))
        best_norm = int(np.argmax(np.array(loglik) / np.array(nbytes)))
        out.append({"id": it.id, "document": it.document, "answer": it.answer, "loglik": loglik, "bytes": nbytes,
                    "tokens": tokens, "correct": int(best == it.answer), "correct_norm": int(best_norm == it.answer)})  # fmt: skip
    return out


def evaluate_items(
    model: EvalModel,
    items: Sequence[ChoiceItem],
    data: EvalData,
    *,
    settings: dict[str, Any],
    batch_size: int = 16,
    level: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The task result of multiple-choice ``items`` (``per_unit`` = items, ``metrics`` acc/acc_norm)."""
    start = time.perf_counter()
    task = items[0].task
    result: dict[str, Any] = {
        "task": task, "units": "items", "data_sha256": data.digest, "items_sha256": items_digest(items),
        "settings": settings, "chance": float(np.mean([1.0 / len(it.choices) for it in items])),
        "per_unit": score_items(model, items, batch_size=batch_size, progress=progress),
    }  # fmt: skip
    result["metrics"] = summarise(task, result, level=level, n_resamples=n_resamples, seed=seed)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
