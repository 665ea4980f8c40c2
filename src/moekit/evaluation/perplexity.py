"""Held-out perplexity: bits per byte (byte-level models, or any model scoring text) and NLL per token.

Each document is tokenised whole (after cutting it to ``max_doc_bytes``) and scored with rolling
windows of the model's context (``scoring.rolling_windows``): every token but the first is predicted
exactly once, from up to ``context`` preceding tokens of the same document; ``stride`` < context
gives every counted token at least ``context - stride + 1`` tokens of context, at ``context/stride``
times the cost. Hugging Face models get their BOS (else EOS) token prepended to text documents,
as lm-eval's rolling log-likelihood does, so that their first token is predicted too.

Per document: ``nats`` (summed negative log-likelihood), ``tokens`` (predicted tokens), ``bytes``
(UTF-8 bytes those tokens cover: the predicted bytes at byte level, the document's bytes otherwise;
None for token-id documents of tokenised models) and ``bits = nats / ln 2``. Bits per byte is
``sum bits / sum bytes`` over documents, with a bootstrap CI over documents.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .documents import Document, EvalData
from .lm import EvalModel
from .metrics import summarise
from .scoring import progress_bar, rolling_windows, target_logprobs

__all__ = ["document_tokens", "evaluate_perplexity"]


def document_tokens(model: EvalModel, doc: Document, max_doc_bytes: int | None = None) -> tuple[list[int], int | None]:
    """``(token ids to score, bytes they predict)`` of ``doc`` for ``model``; the first id is context only."""
    if doc.tokens is not None:
        ids = list(doc.tokens)
        model.check_tokens(ids, f"document {doc.id!r}")
        return ids, (len(ids) - 1 if model.byte_level else None)
    text = doc.text[:max_doc_bytes] if max_doc_bytes is not None else doc.text
    if not model.byte_level:
        text = text.decode("utf-8", errors="ignore").encode("utf-8")  # a cut never splits a character
    ids = model.encode(text)
    if model.byte_level:
        return ids, len(ids) - 1
    if model.prefix_token is not None:
        return [model.prefix_token] + ids, len(text)
    return ids, len(text) - len(model.decode(ids[:1]).encode("utf-8"))


def evaluate_perplexity(
    model: EvalModel,
    data: EvalData,
    *,
    stride: int | None = None,
    max_doc_bytes: int | None = None,
    batch_size: int = 16,
    level: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every document of ``data``; returns the task result (``per_unit`` = documents, ``metrics``).

    Documents with fewer than two tokens are listed under ``skipped`` (nothing to predict).
    """
    start = time.perf_counter()
    stride = stride or model.context
    rows, owners, skips = [], [], []
    units: list[dict[str, Any]] = []
    skipped = []
    for doc in data.documents:
        ids, nbytes = document_tokens(model, doc, max_doc_bytes)
        if len(ids) < 2:
            skipped.append(doc.id)
            continue
        for begin, end, skip in rolling_windows(len(ids), model.context, stride):
            rows.append(ids[begin:end])
            owners.append(len(units))
            skips.append(skip)
        units.append({"id": doc.id, "nats": 0.0, "tokens": len(ids) - 1, "bytes": nbytes})
    if not units:
        raise ValueError("no document has two or more tokens to score")
    with progress_bar(len(rows), f"perplexity {model.name}", progress) as bar:
        scores = target_logprobs(model, rows, batch_size=batch_size, bar=bar)
    for owner, skip, logp in zip(owners, skips, scores):
        units[owner]["nats"] -= float(logp[skip:].sum())
    for unit in units:
        unit["bits"] = unit["nats"] / math.log(2)
    result: dict[str, Any] = {
        "task": "perplexity", "units": "documents", "data_sha256": data.digest,
        "settings": {"context": model.context, "stride": stride, "max_doc_bytes": max_doc_bytes,
                     "prefix_token": model.prefix_token if data.has_text else None},
        "per_unit": units, "skipped": skipped,
    }  # fmt: skip
    result["metrics"] = summarise("perplexity", result, level=level, n_resamples=n_resamples, seed=seed)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
