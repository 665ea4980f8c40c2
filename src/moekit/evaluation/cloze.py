"""Cloze items: a masked name, with distractor names from other documents.

The blank is one occurrence of an identifier-like word (``[A-Za-z_][A-Za-z0-9_]*``, at least
``min_span_bytes`` long, not a Python keyword) with at least 32 bytes of the document before it and
``suffix_bytes`` after it. Context: up to ``context_bytes`` before the blank; suffix: the
``suffix_bytes`` after it. Choices: the true word and ``distractors`` words from other documents of
the same length (as in ``choice``). Each choice is scored as ``log p(choice + suffix | context)``, so
the text after the blank (where the name is often used again) counts, as in a bidirectional cloze;
``acc_norm`` divides by the bytes of ``choice + suffix``.
"""

from __future__ import annotations

import keyword
import re

from .._checks import check_int
from .choice import MIN_CONTEXT_BYTES, Candidate, ChoiceItem, DistractorPool, sample_items
from .documents import EvalData, char_start

__all__ = ["build_cloze_items"]

WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
KEYWORDS = frozenset(k.encode() for k in keyword.kwlist)


def build_cloze_items(
    data: EvalData,
    *,
    items: int = 500,
    distractors: int = 3,
    seed: int = 0,
    context_bytes: int = 256,
    suffix_bytes: int = 24,
    min_span_bytes: int = 3,
) -> list[ChoiceItem]:
    """Cloze items from the text documents of ``data`` (deterministic for a given ``seed``)."""
    if not data.has_text:
        raise ValueError("cloze items need text documents; token-id files support perplexity and generate only")
    check_int("suffix_bytes", suffix_bytes, low=1)
    check_int("min_span_bytes", min_span_bytes, low=1)
    check_int("context_bytes", context_bytes, low=MIN_CONTEXT_BYTES)
    candidates: list[list[Candidate]] = []
    entries: list[tuple[int, bytes]] = []
    for d, doc in enumerate(data.documents):
        text, found, seen = doc.text, [], {}
        for match in WORD.finditer(text):
            word = match.group()
            if len(word) < min_span_bytes or word in KEYWORDS:
                continue
            if word not in seen:
                seen[word] = None
                entries.append((d, word))
            start, end = match.span()
            if start >= MIN_CONTEXT_BYTES and end + suffix_bytes <= len(text):
                suffix = text[end : char_start(text, end + suffix_bytes)]
                found.append(Candidate(d, start, word, suffix))
        candidates.append(found)
    return sample_items("cloze", data, candidates, DistractorPool(entries), context_bytes=context_bytes,
                        items=items, distractors=distractors, seed=seed)  # fmt: skip
