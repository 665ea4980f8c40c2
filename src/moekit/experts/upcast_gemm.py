"""bf16 and fp16 products on CPUs where torch has no GEMM for them: the weights widened to fp32 in cache-sized
blocks.

oneDNN runs bf16 matrix products only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``), fp16 ones only with AVX512-FP16 or AMX-FP16
(``_is_mkldnn_fp16_supported``). Elsewhere -- AVX2 CPUs such as AMD EPYC Zen 2/3 and Intel client cores --
``F.linear`` on them falls back to a reference loop: measured on an AVX2 AMD EPYC (Zen 3, one thread) it reads
Qwen3-30B-A3B's expert matrices at 1.2-1.4 GB/s for 8 rows and 0.16-0.17 GB/s for 64 in bf16 (fp16 alike:
5-7 GMAC/s at any number of rows), 4-7x slower than the same product widened to fp32 and run on fp32 BLAS. Widening a whole expert
matrix per call costs a fresh multi-MB allocation and its page faults (Mixtral's 7168 x 4096 matrix: 0.6
GB/s); ``linear_via_fp32`` widens ``BLOCK_BYTES`` of weight rows at a time into one buffer that stays in
cache, so the weights are read from memory once, as bf16, and the fp32 GEMM reads the block from cache.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import Tensor

__all__ = ["BLOCK_BYTES", "MIN_ROWS", "linear_via_fp32", "serves", "torch_gemm_is_reference"]

#: fp32 bytes of one widened block of weight rows: the GEMM reads it from cache; smaller blocks make
#: shorter GEMMs (AVX2 AMD EPYC, 16-1024 rows of Qwen3's and Mixtral's matrices: 128 KB 0.4-0.8x the rate of
#: 1 MB, 1-4 MB level, 16 MB up to 0.3x at 16-32 rows, a block past the 32 MB L3 share)
BLOCK_BYTES = 2 * 2**20


#: rows of x from which the widened blocks beat torch's reference loop, by dtype. fp16 (AVX2 AMD EPYC, Zen 3,
#: one thread, Qwen3-30B-A3B's and Mixtral's expert matrices, F.linear / blocks): 1 row 12.2-13.8 / 7.8-10.1
#: GB/s, 2 rows 6.3-6.9 / 4.7-5.1, 3 rows 4.3-4.6 / 3.5-3.6, 4 rows 3.1-3.4 / 3.9-4.9, 16 rows 0.8-0.9 / 2.9-3.2,
#: 64 rows 0.19-0.22 / 1.1, 256 rows 0.05 / 0.29-0.31. bf16 from 1 row: the native kernel takes its decode rows
#: where it is built, and the blocks the rest (1-3 rows: F.linear 3.4-10.9 GB/s, the blocks 3.4-8.3); fp16 too
#: where the kernel has it (F16C), so the blocks take fp16 only past its rows or where it is not built.
MIN_ROWS = {torch.bfloat16: 1, torch.float16: 4}

_ONEDNN_HAS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.cache
def torch_gemm_is_reference(dtype: torch.dtype) -> bool:
    """Whether torch runs CPU GEMMs in ``dtype`` (bf16 or fp16) on its reference loop here: an x86 CPU where
    oneDNN has no kernels for it (other architectures' torch builds bring their own, not measured: left to
    torch). False for other dtypes."""
    if dtype not in _ONEDNN_HAS or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not (torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, _ONEDNN_HAS[dtype])()))


def serves(dtype: torch.dtype, rows: int) -> bool:
    """Whether a CPU product of ``rows`` rows in ``dtype`` should run on the widened blocks rather than torch."""
    return dtype in MIN_ROWS and rows >= MIN_ROWS[dtype] and torch_gemm_is_reference(dtype)


def linear_via_fp32(x_MI: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``x @ W^T + b`` for bf16 or fp16 ``x [M, I]``, ``W [O, I]``, ``b [O]`` -> ``[M, O]`` in x's dtype,
    accumulated in fp32 (as oneDNN's bf16 GEMM and moekit's native kernel do; equal to ``F.linear`` on the fp32
    values, then rounded). ``W`` is widened ``BLOCK_BYTES`` of rows at a time into one buffer; each block's output
    columns come from one fp32 GEMM, written straight into the transposed result ``[O, M]``."""
    if x_MI.dim() != 2 or weight_OI.dim() != 2 or x_MI.shape[1] != weight_OI.shape[1]:
        raise ValueError(f"x [M, I] and weight [O, I] must agree on I; got {tuple(x_MI.shape)} and {tuple(weight_OI.shape)}")
    O, I = weight_OI.shape
    x_IM = x_MI.float().t()
    out_OM = torch.empty(O, x_MI.shape[0], dtype=torch.float32, device=x_MI.device)
    rows = max(1, min(O, BLOCK_BYTES // (4 * I)))
    block = torch.empty(rows, I, dtype=torch.float32, device=x_MI.device)
    for r in range(0, O, rows):
        n = min(rows, O - r)
        wide = block[:n].copy_(weight_OI[r : r + n])
        torch.mm(wide, x_IM, out=out_OM[r : r + n])
    if bias_O is not None:
        out_OM += bias_O.float()[:, None]
    return torch.empty(x_MI.shape[0], O, dtype=x_MI.dtype, device=x_MI.device).copy_(out_OM.t())  # one pass: transpose, round
