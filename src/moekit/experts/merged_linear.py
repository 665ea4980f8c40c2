"""Fused "merge, then apply" linear map for SMEAR (https://arxiv.org/abs/2306.03745).

``merged_linear(x_GSI, probs_GE, w_EOI, b_EO)`` computes, for every group g (example or segment) of S
rows, ``x_g @ W_g^T + b_g`` with the merged parameters ``W_g = sum_e probs[g, e] * w_e`` (and ``b_g``
alike). ``merged_linear_reference`` is the plain autograd version (one merge matmul + one batched matmul).

Why fused: the plain version materialises the merged weights of the whole batch (G * O * I values, 32 MB
per FFN layer at G=16, D=512, F=1024) in forward and their gradient in backward, and keeps the merged
weights for backward. Both paths here keep only ``x``, ``probs`` and references to the stacked parameters
for backward, and recompute merges there.

**Native path** (fp32 CPU operands, a kernel built with AVX-512: ``runs_native``): the three products of
forward and backward run in ``native_gemv.merged_forward`` / ``merged_grad_input`` / ``merged_grad_weights``,
which never hold a merged copy of a layer: 64 output columns at a time are merged for every group (each
expert value read once) and run on the broadcast tiles over the whole inner dimension; ``grad_probs`` and
``grad_w`` are taken from the accumulators of each ``grad_W_g`` tile, so no ``[G, O, I]`` tensor exists in
forward or backward. FFN case of ``benchmarks/bench_smear.py`` (AMD EPYC, 1 and 2 threads): the SMEAR step
at 1.18-1.24x one expert's, where the torch path below runs 1.45-1.55x.

**Torch path** (other dtypes, CUDA, no kernel): output features in chunks of rows of ``W``; each chunk's
merged weights live in one small reused buffer (at most ``chunk_bytes``; fresh buffers that large come
from ``mmap`` on CPU and are page-faulted in on every call); backward recomputes them chunk by chunk, last
chunk first: when no other call fetched the buffer since this forward (the layer right before the loss),
it still holds that chunk merged and its re-merge is skipped. Per chunk (``grad_y_g[:, chunk]`` is read in
place, a strided view, not copied) backward accumulates:

* ``grad_x_g += grad_y_g[:, chunk] @ W_g[chunk]``
* ``grad_W_g[chunk] = grad_y_g[:, chunk]^T @ x_g`` (into a reused buffer, never for the whole layer)
* ``grad_probs[g, e] += <grad_W_g[chunk], w_e[chunk]>``  (``long_dots``: a batched matmul over blocks of
  the chunk, summed)
* ``grad_w[:, chunk] = probs^T @ grad_W[chunk]``  (one ``[E, G] @ [G, n]`` matmul, written in place)

Its four merge-sized products (merge, re-merge, the two gradients above), each E multiply-adds per weight
and group, are short-K GEMMs whose ``G * O * I`` output streams through memory (copy-like traffic, ~0.25x of
one expert's step on CPU), which is why the native path exists.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["DEFAULT_CHUNK_BYTES", "merged_linear", "merged_linear_reference", "runs_native"]

#: merged weights per chunk: small enough to be reused from the allocator's cache (not mmap-ed afresh)
DEFAULT_CHUNK_BYTES = 16 * 2**20
#: blocks of the inner dimension in ``long_dots``
DOT_BLOCKS = 1024


def long_dots(a_AK: Tensor, b_BK: Tensor) -> Tensor:
    """``a @ b^T`` for few rows and a long inner dimension: ``[A, K] x [B, K] -> [A, B]`` (``a``, ``b`` with
    unit column stride). One GEMM with two tiny outer dimensions streams its operands at a third of the
    read rate (MKL, ``[8, 2^19] x [2^19, 16]``: 8.6 GB/s); the same as ``DOT_BLOCKS`` products over blocks of
    ``K`` in one batched matmul, summed, reads at 24 GB/s. A ``K`` with few such blocks keeps the GEMM."""
    K = a_AK.shape[1]
    blocks = math.gcd(K, DOT_BLOCKS)
    if blocks < 64:
        return a_AK @ b_BK.t()
    a = a_AK.unflatten(1, (blocks, K // blocks)).transpose(0, 1)  # [blocks, A, k]
    b = b_BK.unflatten(1, (blocks, K // blocks)).permute(1, 2, 0)  # [blocks, k, B]
    return torch.bmm(a, b).sum(0)


def merged_linear_reference(x_GSI: Tensor, probs_GE: Tensor, w_EOI: Tensor, b_EO: Tensor | None = None) -> Tensor:
    """Plain autograd: merge every group's weights at once, then one batched matmul. ``[G, S, O]``."""
    E, O, I = w_EOI.shape
    G = probs_GE.shape[0]
    p = probs_GE.to(w_EOI.dtype)
    w_GOI = (p @ w_EOI.reshape(E, O * I)).reshape(G, O, I)
    y = x_GSI @ w_GOI.transpose(1, 2)
    return y if b_EO is None else y + (p @ b_EO).unsqueeze(1)


_SCRATCH = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused buffer of at least ``numel`` values for ``name`` (per thread, dtype and device): the merged
    weights of one chunk and their gradient. Fresh buffers of this size (megabytes) come from ``mmap`` on
    CPU and are page-faulted in on every call -- measured 20-25% of SMEAR's FFN step (bench_smear.py
    --profile); kept, they cost ``2 * chunk_bytes`` per thread that ran SMEAR. The caller is its new writer:
    whatever ``_claim`` said the buffer held no longer holds."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    _SCRATCH.__dict__.setdefault("holders", {})[key] = None
    return buf[:numel]


def _claim(name: str, dtype: torch.dtype, device: torch.device) -> object:
    """Say that scratch buffer ``name`` holds what its last ``_scratch`` caller wrote; returns the token
    ``_holds`` checks (void once anyone fetches that buffer again)."""
    token = object()
    _SCRATCH.__dict__.setdefault("holders", {})[(name, dtype, device)] = token
    return token


def _holds(name: str, dtype: torch.dtype, device: torch.device, token: object) -> bool:
    return _SCRATCH.__dict__.get("holders", {}).get((name, dtype, device)) is token


def _rows_per_chunk(G: int, O: int, I: int, element_size: int, chunk_bytes: int) -> int:
    return max(1, min(O, chunk_bytes // max(1, G * I * element_size)))


def runs_native(*operands: Tensor) -> bool:
    """Whether ``merged_linear`` of these operands takes the native merged products: all fp32 CPU tensors and
    a kernel built with AVX-512 (``native_gemv.merged_available``; ``MOEKIT_NATIVE_GEMV=0`` turns it off)."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in operands):
        return False
    from . import native_gemv

    return native_gemv.merged_available()


class _MergedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_GSI: Tensor, probs_GE: Tensor, w_EOI: Tensor, b_EO: Tensor | None, chunk_bytes: int) -> Tensor:  # type: ignore[override]
        p = probs_GE.to(w_EOI.dtype).contiguous()
        ctx.native = runs_native(x_GSI, p, w_EOI, *([] if b_EO is None else [b_EO]))
        ctx.has_bias = b_EO is not None
        ctx.save_for_backward(x_GSI, p, w_EOI, b_EO)
        if ctx.native:
            from . import native_gemv

            return native_gemv.merged_forward(x_GSI, p, w_EOI, b_EO)
        G, S, I = x_GSI.shape
        E, O, _ = w_EOI.shape
        rows = _rows_per_chunk(G, O, I, w_EOI.element_size(), chunk_bytes)
        buf = _scratch("merged", G * rows * I, w_EOI.dtype, w_EOI.device)
        w_E_OI = w_EOI.reshape(E, O * I)
        y = torch.empty(G, S, O, dtype=x_GSI.dtype, device=x_GSI.device)
        b_GO = None if b_EO is None else p @ b_EO
        for o0 in range(0, O, rows):
            n = min(rows, O - o0)
            m_GnI = torch.mm(p, w_E_OI[:, o0 * I : (o0 + n) * I], out=buf[: G * n * I].view(G, n * I)).view(G, n, I)
            out = y[:, :, o0 : o0 + n]
            if b_GO is None:
                torch.bmm(x_GSI, m_GnI.transpose(1, 2), out=out)
            else:
                torch.baddbmm(b_GO[:, o0 : o0 + n].unsqueeze(1), x_GSI, m_GnI.transpose(1, 2), out=out)
        ctx.rows = rows
        ctx.merged_token = _claim("merged", w_EOI.dtype, w_EOI.device)  # the last chunk's merged weights
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_GSO: Tensor):  # type: ignore[override]
        x_GSI, p, w_EOI, b_EO = ctx.saved_tensors
        need_x, need_p, need_w, need_b = ctx.needs_input_grad[:4]
        if ctx.native:
            from . import native_gemv

            grad_x = native_gemv.merged_grad_input(grad_GSO, p, w_EOI) if need_x else None
            grad_w, grad_p = (native_gemv.merged_grad_weights(x_GSI, grad_GSO, p, w_EOI, want_w=need_w, want_probs=need_p)
                              if need_w or need_p else (None, None))  # fmt: skip
            grad_pT = None if grad_p is None else grad_p.t()
        else:
            grad_x, grad_pT, grad_w = _chunked_backward(ctx, grad_GSO, x_GSI, p, w_EOI)
        grad_b = None
        if ctx.has_bias and (need_p or need_b):
            gb_GO = grad_GSO.sum(1)
            if need_p:
                grad_pT.addmm_(b_EO, gb_GO.t())
            if need_b:
                grad_b = p.t() @ gb_GO
        grad_p = None if grad_pT is None else grad_pT.t()
        return grad_x, grad_p, grad_w, grad_b, None


def _chunked_backward(ctx, grad_GSO: Tensor, x_GSI: Tensor, p: Tensor, w_EOI: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_probs^T, grad_w)`` of the torch path, chunk by chunk as the module docstring says."""
    need_x, need_p, need_w = ctx.needs_input_grad[:3]
    G, S, I = x_GSI.shape
    E, O, _ = w_EOI.shape
    rows = ctx.rows
    w_E_OI = w_EOI.reshape(E, O * I)
    grad_x = torch.empty(G, S, I, dtype=x_GSI.dtype, device=x_GSI.device) if need_x else None
    grad_pT = torch.zeros(E, G, dtype=p.dtype, device=p.device) if need_p else None
    grad_w = torch.empty_like(w_EOI) if need_w else None
    # last chunk first: when no other call used the buffer since forward, it still holds that chunk merged
    merged_kept = need_x and _holds("merged", p.dtype, p.device, ctx.merged_token)
    merged = _scratch("merged", G * rows * I, p.dtype, p.device) if need_x else None
    grad_m = _scratch("grad_merged", G * rows * I, p.dtype, p.device) if (need_p or need_w) else None
    for i, o0 in enumerate(reversed(range(0, O, rows))):
        n = min(rows, O - o0)
        g_GSn = grad_GSO[:, :, o0 : o0 + n]  # a strided view: bmm reads it in place (row stride O)
        w_chunk = w_E_OI[:, o0 * I : (o0 + n) * I]
        if need_x:
            m_GnI = merged[: G * n * I].view(G, n, I)
            if not (i == 0 and merged_kept):
                torch.mm(p, w_chunk, out=m_GnI.view(G, n * I))
            if i == 0:
                torch.bmm(g_GSn, m_GnI, out=grad_x)
            else:
                grad_x.baddbmm_(g_GSn, m_GnI)
        if grad_m is not None:
            gm_GnI = torch.bmm(g_GSn.transpose(1, 2), x_GSI, out=grad_m[: G * n * I].view(G, n, I))
            gm_G_nI = gm_GnI.view(G, n * I)
            if need_p:
                grad_pT += long_dots(w_chunk, gm_G_nI)
            if need_w:
                torch.mm(p.t(), gm_G_nI, out=grad_w.view(E, O * I)[:, o0 * I : (o0 + n) * I])
    return grad_x, grad_pT, grad_w


def merged_linear(
    x_GSI: Tensor, probs_GE: Tensor, w_EOI: Tensor, b_EO: Tensor | None = None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor:
    """``x_g @ (sum_e probs[g, e] w_e)^T + sum_e probs[g, e] b_e`` for every group g, fused and chunked.

    Args:
        x_GSI: ``[G, S, I]`` inputs, S rows per group.
        probs_GE: ``[G, E]`` merge weights (any float dtype; cast to the weights' dtype).
        w_EOI: ``[E, O, I]`` stacked weights (nn.Linear layout); b_EO: optional ``[E, O]`` stacked biases.
        chunk_bytes: at most this many bytes of merged weights exist at once (at least one row of W per group).
    Returns:
        ``[G, S, O]``; equal to ``merged_linear_reference`` in outputs and gradients (first order only).
    """
    return _MergedLinear.apply(x_GSI, probs_GE, w_EOI, b_EO, chunk_bytes)
