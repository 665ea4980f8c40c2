"""A short generative check against a reference (the uncompressed original), because multiple-choice
scores hide generative damage.

Prompts: ``prompt_length`` bytes of a held-out document ending at a line start (token-id documents:
``prompt_length`` tokens at any position), drawn as the MC items are (``round_robin``, seeded). Each
model continues each prompt greedily for ``new_tokens`` tokens. Per prompt, with a reference:

* ``kl``: summed ``KL(p_ref || p_model)`` (nats) over the prompt positions (the ``positions``
  next-token distributions whose context is held-out text, the last one predicting the first new
  token); ``top1``: how many of those positions have the same argmax in both models;
* ``agree``: on the reference's greedy continuation (teacher forced), how many of the
  ``new_tokens`` positions have the same argmax in both models (token-level greedy agreement);
* ``prefix``: length of the common prefix of the two free-running greedy continuations;
* ``repeats`` / ``ngrams``: repeated ``ngram``-grams (rep-n, Welleck et al. 2019:
  ``1 - distinct / total`` n-grams) of the model's continuation; ``reference_repeats`` the
  reference's; ``text_repeats`` / ``text_ngrams`` those of the held-out text that really follows.

Without a reference only the repetition fields are filled. Both models are run on the same rows in
the same batches, so a model compared with itself gets KL 0 and agreement 1 exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch.nn.functional as F

from .._checks import check_int
from .documents import EvalData, char_start, round_robin
from .lm import EvalModel
from .metrics import summarise
from .scoring import forward_batches, greedy_continuations, progress_bar

__all__ = ["Prompt", "build_prompts", "prompts_digest", "repeated_ngrams", "evaluate_generation"]

#: bytes of true continuation kept per new token (enough text for any tokenizer)
TEXT_BYTES_PER_TOKEN = 8


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt and the text (or tokens) that really follows it."""

    id: str
    document: str
    offset: int
    prompt: bytes | tuple[int, ...]
    continuation: bytes | tuple[int, ...]


def build_prompts(
    data: EvalData, *, prompts: int = 32, prompt_length: int = 64, new_tokens: int = 32, seed: int = 0
) -> list[Prompt]:
    """Up to ``prompts`` prompts spread over the documents (deterministic for a given ``seed``)."""
    check_int("prompts", prompts, low=1)
    check_int("prompt_length", prompt_length, low=1)
    check_int("new_tokens", new_tokens, low=1)
    groups: list[list[tuple[int, int]]] = []
    for d, doc in enumerate(data.documents):
        if doc.text is not None:
            starts = [i + 1 for i, byte in enumerate(doc.text) if byte == 0x0A]
            groups.append([(d, s) for s in starts if prompt_length <= s < len(doc.text) - 1])
        else:
            groups.append([(d, s) for s in range(prompt_length, len(doc) - 1)])
    rng = np.random.default_rng(seed)
    out = []
    for d, offset in round_robin(groups, rng):
        if len(out) == prompts:
            break
        doc = data.documents[d]
        if doc.text is not None:
            prompt = doc.text[char_start(doc.text, offset - prompt_length) : offset]
            continuation: bytes | tuple[int, ...] = doc.text[offset : offset + TEXT_BYTES_PER_TOKEN * new_tokens]
        else:
            prompt, continuation = doc.tokens[offset - prompt_length : offset], doc.tokens[offset : offset + new_tokens]
        out.append(Prompt(f"gen-{len(out)}", doc.id, offset, prompt, continuation))
    if not out:
        raise ValueError(f"no document is longer than prompt_length={prompt_length}; shorten the prompts")
    return out


def prompts_digest(prompts: Sequence[Prompt], new_tokens: int, ngram: int) -> str:
    """SHA-256 of the prompts' exact content and the generation settings (equal digests: same check)."""
    h = hashlib.sha256(json.dumps([new_tokens, ngram]).encode())
    for p in prompts:
        h.update(json.dumps([p.id, p.document, p.offset]).encode() + b"\0")
        for part in (p.prompt, p.continuation):
            h.update((part if isinstance(part, bytes) else json.dumps(list(part)).encode()) + b"\0")
    return h.hexdigest()


def repeated_ngrams(tokens: Sequence[int], n: int) -> tuple[int, int]:
    """``(repeated, total)`` n-grams of ``tokens``: ``total - distinct`` and ``len - n + 1``."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(dict.fromkeys(grams)), len(grams)


def _ids(model: EvalModel, p: Prompt, new_tokens: int) -> tuple[list[int], list[int]]:
    """Prompt ids (cut from the left so that prompt + new tokens fit the context) and true continuation."""
    if isinstance(p.prompt, bytes):
        prompt, text = model.encode_pair(p.prompt, p.continuation)
    else:
        prompt, text = list(p.prompt), list(p.continuation)
        model.check_tokens(prompt + text, f"prompt {p.id} (document {p.document!r})")
    room = model.context - new_tokens + 1
    if room < 1:
        raise ValueError(f"new_tokens={new_tokens} does not fit the context of {model.name!r} ({model.context}); lower it")
    return prompt[-room:], text[:new_tokens]


def evaluate_generation(
    model: EvalModel,
    prompts: Sequence[Prompt],
    data: EvalData,
    *,
    reference: EvalModel | None = None,
    new_tokens: int = 32,
    ngram: int = 4,
    batch_size: int = 16,
    level: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
    progress: bool = False,
    examples: int = 3,
) -> dict[str, Any]:
    """The generate task result (``per_unit`` = prompts) of ``model`` against ``reference``."""
    start = time.perf_counter()
    check_int("ngram", ngram, low=1)
    if reference is not None and not model.same_vocabulary(reference):
        raise ValueError(f"{model.name!r} and the reference {reference.name!r} do not share a vocabulary")
    if reference is not None and reference.context < model.context:
        raise ValueError(f"the reference's context ({reference.context}) is shorter than the model's ({model.context})")
    pairs = [_ids(model, p, new_tokens) for p in prompts]
    prompt_ids = [a for a, _ in pairs]
    runs = 2 if reference is not None else 1
    with progress_bar(runs * len(prompts), f"generate {model.name}", progress) as bar:
        conts = greedy_continuations(model, prompt_ids, new_tokens, batch_size=batch_size, bar=bar)
        refs = greedy_continuations(reference, prompt_ids, new_tokens, batch_size=batch_size, bar=bar) if reference else None
    units = []
    for p, (prompt, text), cont in zip(prompts, pairs, conts):
        repeats, grams = repeated_ngrams(cont, ngram)
        text_repeats, text_grams = repeated_ngrams(text, ngram)
        units.append({"id": p.id, "document": p.document, "offset": p.offset, "prompt_tokens": len(prompt),
                      "repeats": repeats, "ngrams": grams, "text_repeats": text_repeats,
                      "text_ngrams": text_grams})  # fmt: skip
    if refs is not None:
        _against_reference(model, reference, prompt_ids, refs, conts, units, ngram, batch_size)
    result: dict[str, Any] = {
        "task": "generate", "units": "prompts", "data_sha256": data.digest,
        "items_sha256": prompts_digest(prompts, new_tokens, ngram),
        "reference": reference.info.get("path", reference.name) if reference is not None else None,
        "settings": {"new_tokens": new_tokens, "ngram": ngram, "prompts": len(prompts)},
        "per_unit": units,
        "examples": [
            {"prompt": model.decode(prompt_ids[i][-80:]), "model": model.decode(conts[i]),
             "reference": model.decode(refs[i]) if refs is not None else None, "text": model.decode(pairs[i][1])}
            for i in range(min(examples, len(prompts)))
        ],
    }  # fmt: skip
    result["metrics"] = summarise("generate", result, level=level, n_resamples=n_resamples, seed=seed)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _against_reference(
    model: EvalModel, reference: EvalModel, prompt_ids: list[list[int]], refs: list[list[int]],
    conts: list[list[int]], units: list[dict[str, Any]], ngram: int, batch_size: int,
) -> None:  # fmt: skip
    """Fill the KL / agreement / prefix fields of ``units`` (teacher forced on the reference's text)."""
    rows = [p + r[:-1] for p, r in zip(prompt_ids, refs)]
    batches = zip(forward_batches(model, rows, batch_size=batch_size),
                  forward_batches(reference, rows, batch_size=batch_size))  # fmt: skip
    for (index, logits, lengths), (_, ref_logits, _) in batches:
        logp, ref_logp = F.log_softmax(logits, dim=-1), F.log_softmax(ref_logits, dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, S]
        same = logits.argmax(-1) == ref_logits.argmax(-1)  # [B, S]
        for b, i in enumerate(index):
            P = len(prompt_ids[i])
            prefix = next((j for j, (x, y) in enumerate(zip(conts[i], refs[i])) if x != y), len(refs[i]))
            units[i].update({
                "kl": float(kl[b, :P].double().sum()), "positions": P, "top1": int(same[b, :P].sum()),
                "agree": int(same[b, P - 1 : lengths[b]].sum()), "new_tokens": len(refs[i]), "prefix": prefix,
                "reference_repeats": repeated_ngrams(refs[i], ngram)[0],
            })  # fmt: skip
