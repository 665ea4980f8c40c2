"""Forward passes shared by every task: batched log-likelihoods of token rows and greedy decoding.

Rows of different lengths are sorted by length, right-padded and run in batches; padding follows
the real tokens, so with causal attention it never changes a real token's distribution (for models
whose routing treats tokens independently, as top-k routers do). Nothing here depends on the task.
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_int
from .lm import EvalModel

__all__ = ["forward_batches", "target_logprobs", "rolling_windows", "greedy_continuations", "progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    return tqdm(total=total, desc=desc, disable=not enabled or not sys.stderr.isatty(), leave=False)


def forward_batches(
    model: EvalModel, rows: Sequence[Sequence[int]], *, batch_size: int = 16, bar: tqdm | None = None
) -> Iterator[tuple[list[int], Tensor, list[int]]]:
    """Run ``rows`` (each at most ``model.context`` tokens) in batches of similar length.

    Yields ``(row indices, logits [B, S, V] float32, row lengths)``; logits beyond a row's length
    are padding. The batching depends only on the row lengths, so two models given the same rows see
    the same batches (``zip`` them to compare distributions).
    """
    check_int("batch_size", batch_size, low=1)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        lengths = [len(rows[i]) for i in index]
        if lengths[0] > model.context:
            raise ValueError(f"a row of {lengths[0]} tokens exceeds the context of {model.name!r} ({model.context})")
        if min(lengths) < 1:
            raise ValueError("cannot score an empty row")
        ids = torch.zeros(len(index), lengths[0], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(index):
            ids[b, : lengths[b]] = torch.as_tensor(rows[i], dtype=torch.long)
            mask[b, : lengths[b]] = 1
        yield index, model.logits(ids, mask), lengths
        if bar is not None:
            bar.update(len(index))


def target_logprobs(
    model: EvalModel, rows: Sequence[Sequence[int]], *, batch_size: int = 16, bar: tqdm | None = None
) -> list[Tensor]:
    """For each row ``r`` (at most ``context + 1`` tokens), ``log p(r[t] | r[:t])`` for ``t = 1..len-1``:
    a float64 tensor of ``len(r) - 1`` values (natural log)."""
    inputs = [r[:-1] for r in rows]
    if any(len(r) < 2 for r in rows):
        raise ValueError("every scored row needs at least 2 tokens (one of context, one predicted)")
    out: list[Tensor] = [torch.empty(0)] * len(rows)
    for index, logits, lengths in forward_batches(model, inputs, batch_size=batch_size, bar=bar):
        logp = F.log_softmax(logits, dim=-1)
        for b, i in enumerate(index):
            targets = torch.as_tensor(rows[i][1:], dtype=torch.long, device=logp.device)
            out[i] = logp[b, : lengths[b]].gather(-1, targets[:, None])[:, 0].double().cpu()
    return out


def rolling_windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``length`` tokens that predict every token but the first exactly once.

    Returns ``(begin, end, skip)`` triples: the row ``ids[begin:end]`` (at most ``context + 1``
    tokens) predicts ``ids[begin+1:end]``, of which the first ``skip`` were counted by an earlier
    window and are context only. Consecutive windows start ``stride`` tokens apart, so every
    counted token after the first window sees at least ``context - stride + 1`` tokens of context.
    """
    check_int("context", context, low=1)
    check_int("stride", stride, low=1, high=context)
    windows = []
    counted, begin = 1, 0  # counted: the next target position not yet predicted
    while counted < length:
        end = min(begin + context + 1, length)
        windows.append((begin, end, counted - begin - 1))
        counted, begin = end, begin + stride
    return windows


@torch.no_grad()
def greedy_continuations(
    model: EvalModel, prompts: Sequence[Sequence[int]], new_tokens: int, *, batch_size: int = 16,
    bar: tqdm | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy (argmax) continuation of ``new_tokens`` tokens for each prompt; prompts of equal length
    are decoded together. Each step reruns the whole window (no KV cache): simple, and the same code
    for every model."""
    check_int("new_tokens", new_tokens, low=1)
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if len(p) < 1 or len(p) + new_tokens - 1 > model.context:
            raise ValueError(
                f"a prompt of {len(p)} tokens plus {new_tokens} new tokens exceeds the context of "
                f"{model.name!r} ({model.context})"
            )
        by_length.setdefault(len(p), []).append(i)
    for index in by_length.values():
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            seq = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long)
            for _ in range(new_tokens):
                nxt = model.logits(seq)[:, -1].argmax(dim=-1).cpu()
                seq = torch.cat([seq, nxt[:, None]], dim=1)
            for b, i in enumerate(chunk):
                out[i] = seq[b, len(prompts[i]) :].tolist()
            if bar is not None:
                bar.update(len(chunk))
    return out
