"""A native matrix-vector kernel for MoE decode on CPU: ``y = x W^T (+ b)`` for a few rows of ``x``.

Why: at decode each touched expert's weights are read once for one or a few rows, so the product runs at
the rate the kernel streams memory. torch's GEMVs stream well below that rate (AMD EPYC: MKL's fp32 GEMV
at ~0.55x of ``torch.sum`` over the same bytes, oneDNN's bf16 at ~0.4x; Intel Xeon: 0.5-0.9x,
``benchmarks/bench_infer.py --kernels``). ``native_gemv.c`` reads each weight row from memory once -- in
tiles of 4 weight rows (far apart, 4 streams through distinct pages, the next block prefetched into L2;
8 rows for one or two rows of ``x`` on AMD EPYC) x up to 4 rows of ``x`` -- and accumulates in fp32 (bf16
weights: ``vdpbf16ps`` where the CPU has AVX512_BF16, else widened by a 16-bit shift; AVX-512, AVX2 and
portable C paths). 5-8 rows on AMD EPYC take "pair tiles" (two inputs of up to 8 rows per vector, each
weight pair broadcast). From 9 rows of ``x`` (AVX-512; AVX2: fp32 from 8, bf16 from 16) the rows of ``x``
go across the vector lanes instead (``x^T`` packed once, every weight broadcast against up to 64 rows, 16
on AVX2: "broadcast tiles"), which keeps the FMA units busy where the dot-product tiles run out of load
slots (prefill: 16-64 rows per expert). bf16
products of 5 or more rows run on AMX tiles where the CPU has them (Intel Xeon from Sapphire Rapids). It
optionally fuses a GLU (``act(gate) * up`` of ``[gate; up]`` rows, 64 gate rows then their 64 up rows, each one run of memory) and splits the weight rows over ``threads``
OpenMP threads (torch's own runtime; each thread a contiguous range: distinct memory). On AVX2 the one-call
layer also reads panel copies of the weights (``pack_panels``; a packed bank's): each broadcast tile's rows
input-major, one stream; bf16 tiles widened to fp32 into L2 during the previous tile's pass and run on the fp32
tiles; the 1-4 rows past a multiple of 16 on tail tiles (a vector of each tile's weights, ``x`` broadcast).
A call's working buffers come from a block its thread keeps between calls (``scratch_limit``).

SMEAR's merged products (``merged_forward``, ``merged_grad_input``, ``merged_grad_weights``; fp32, AVX-512) run
the same broadcast tiles against per-example merged weights ``W_g = sum_e p[g, e] W_e`` that are made 64
columns at a time for every example and never held for a whole layer; the backward's gradients of the merge
(``<grad W_g, W_e>`` and ``sum_g p[g, e] grad W_g``) come from each ``grad W_g`` tile, which is never stored.

Build: on first use, with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native -fopenmp``, about
a second) into ``$MOEKIT_CACHE`` (default ``~/.cache/moekit``), named by a hash of the source, the
compiler's version, the command and the CPU's flags; compiled to a temporary file and renamed into place,
so parallel processes never load a partial library. Loaded with ``ctypes`` (the call releases the GIL).

Fallback: with ``MOEKIT_NATIVE_GEMV=0``, no compiler, or a failed build, ``available()`` is False and the
callers (``inference.expert_linear``) keep torch's kernels; a failed build or missing compiler says why
once (a ``RuntimeWarning``). Where the kernel is faster than torch's is ``serves`` (measured rule).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FFN_ACTIVATIONS", "GLU_ACTIVATIONS", "MAX_ROWS", "PANEL_MAX_ROWS", "available", "build_info", "cpu_profile",
           "cpu_vendor", "dtypes", "linear",
           "merged_available", "merged_forward", "merged_grad_input", "merged_grad_weights", "moe_ffn", "pack_panels",
           "panels_available", "scratch_limit", "serves"]

SOURCE = Path(__file__).with_name("native_gemv.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
#: gate activations the kernel fuses into a GLU (index = the C code's ``act``)
GLU_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
#: hidden activations of ``moe_ffn`` (index = the C code's ``act``)
FFN_ACTIVATIONS = {**GLU_ACTIVATIONS, "identity": 4}
#: the C code's dtype codes (``DT_*``); fp16 only where the build has F16C (``dtypes``)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: where the kernel beats torch, per CPU (``cpu_profile``: the vendor, and whether the kernel runs bf16 on
#: AMX tiles; the crossover moves with the cores and with oneDNN's kernels): ``(dtype, torch's alternative
#: is oneDNN-packed) -> ((min features, max rows), ...)``, the first entry whose min features the matrix
#: reaches gives its row limit. A CPU not in the table keeps torch's kernels. Measured with
#: ``benchmarks/bench_infer.py --kernels`` on the Qwen3-30B-A3B, OLMoE and Mixtral expert matrices, 1 thread;
#: read rates in GB/s.
#:
#: * AMD EPYC (AVX-512 + BF16; 9+ rows on the broadcast tiles), native / F.linear / packed: fp32 1 row
#:   20.3-24.4 / 11.3-17.0 / 11.7-13.7, 4 rows 14.8-19.9 / 6.4-10.0 / 14.1-17.0, 8 rows 11.7-13.8 / 5.1-8.2 /
#:   12.1-13.6, 16 rows 10.1-12.4 / 4.0-6.2 / 8.7-10.1, 32 rows 5.2-6.4 / 2.9-4.1 / 5.3-6.0, 64 rows 2.7-3.0 /
#:   1.7-2.5 / 3.1-3.3; bf16 1 row 15.6-23.3 / 7.7-10.1 / 10.9-15.0, 4 rows 11.7-18.0 / 7.0-10.9 /
#:   11.6-18.0, 8 rows 11.2-12.5 / 6.3-9.1 / 10.8-13.6, 16 rows 9.2-11.3 / 5.1-6.6 / 8.2-10.1, 32 rows
#:   4.9-6.2 / 3.7-4.7 / 5.1-5.9, 64 rows 2.3-2.9 / 2.4-2.8 / 2.9-3.2 (``results/amd_epyc/``).
#:   Past 8 rows the products are compute-bound (16 rows of fp32 need 16 multiply-adds per weight read).
#:   Against oneDNN-packed weights the native kernel stops at 32 rows (packed leads from 64). Against the
#:   plain weights it goes to 64: in the layer, at 64 rows per expert, the one-call native layer beats
#:   oneDNN on the plain layout (Qwen3 T=1024: 1.25x against 1.41x of the bound in fp32, 1.42x against 1.50-
#:   1.64x in bf16); at 128 rows oneDNN leads again (OLMoE T=1024: 1.11x against 1.23x).
#:   fp16 (Zen 4 has no AVX512-FP16, so oneDNN no fp16 kernels: torch's fp16 GEMM is a reference loop past one
#:   row, and moekit's alternative from 4 rows the fp32 GEMM on widened blocks, ``upcast_gemm``) runs the dot
#:   tiles with the weights widened by vcvtph2ps, native / alternative: 1 row 16.3-22.7 / 17.1-22.4, 2 rows
#:   15.2-24.6 / 7.5-10.4, 4 rows 12.2-21.8 / 4.0-5.7, 8 rows 8.2-11.9 / 2.8-3.5, 16 rows 4.7-5.9 / 2.9-3.5, 64
#:   rows 1.2-1.5 / 1.0-1.2. (The broadcast, pair and quad tiles with the weights widened as they are broadcast
#:   ran slower than the dot tiles: 6-8 rows 6.6-7.1, 16 rows 3.4-3.6: one conversion per broadcast.) Whole fp16
#:   layers, the one-call layer against the expert loop (ms, interleaved, the most rows an expert got): Qwen3
#:   T=16 (4) 34 / 66, T=256 (29) 222 / 583, T=1024 (84) 850 / 1222, T=4096 (298) 3672 / 3934; Mixtral T=16 (6)
#:   35 / 128, T=256 (73) 457 / 733, T=1024 (273) 1826 / 2195; OLMoE T=1024 (154) 1118 / 1358-1372, T=4096 (575)
#:   4746 / 4869: ahead at every size measured, so up to 1024 rows.
#: * Intel Xeon (AVX-512 + BF16 + AMX), native / oneDNN (fp32: packed, the plain layout reads alike;
#:   bf16: F.linear / packed): fp32 4 rows 10.6-14.5 / 9.9-12.3, 8 rows 8.9-10.8 / 7.9-10.5, 16 rows
#:   6.2-7.3 / 7.0-8.4; bf16 (5 rows on: AMX) 4 rows 11.1-15.1 / 7.3-11.1 / 10.3-12.8, 16 rows 8.5-13.4 /
#:   7.1-10.6 / 10.1-12.4 (native ahead of packed from 3584 features), 64 rows from 3584 features 8.8-9.3
#:   / 6.5-6.6 / 7.9-8.2; below 3584 features 32 rows 5.9-8.3 / 6.7-8.1 / 8.5-9.3.
MAX_ROWS = {
    "AuthenticAMD": {
        (torch.float32, False): ((1, 64),),
        (torch.float32, True): ((1, 32),),
        (torch.bfloat16, False): ((1, 64),),
        (torch.bfloat16, True): ((1, 32),),
        (torch.float16, False): ((1, 1024),),
    },
    "GenuineIntel+AMX": {
        (torch.float32, False): ((1, 8),),
        (torch.float32, True): ((1, 8),),
        (torch.bfloat16, False): ((3584, 64), (1, 16)),
        (torch.bfloat16, True): ((3584, 64), (1, 4)),
    },
}
#: Intel without AMX tiles for the kernel (an older Xeon, or a kernel that refused the tile state): fp32 as
#: measured on the Xeon above, bf16 up to the 4 rows where its vector tiles led there (11.2-14.5 GB/s against
#: 7.6-11.3 for F.linear and 10.5-12.9 packed; a CPU without AMX has slower oneDNN bf16, not faster)
MAX_ROWS["GenuineIntel"] = {**MAX_ROWS["GenuineIntel+AMX"], (torch.bfloat16, False): ((1, 4),), (torch.bfloat16, True): ((1, 4),)}
#: AMD EPYC with AVX2 only (Zen 3: dot tiles of 4 x 4 rows and, from 8 rows in fp32 and 16 in bf16, broadcast
#: tiles of 6 weight rows x 16 rows of x, 256-bit). Kernels alone, GB/s, before the AVX2 broadcast tiles,
#: native / F.linear / oneDNN packed, fp32: 1 row 21.3-23.6 / 16.4-25.7 / 16.0-18.0, 4 rows 16.0-20.4 / 6.7-8.5 /
#: 12.0-12.9, 8 rows 9.5-11.1 / 6.0-7.1 / 9.2-10.2, 16 rows 5.3-5.9 / 4.6-5.4 / 6.0-6.9; bf16, where oneDNN has
#: no bf16 kernels and the alternative is the fp32 GEMM on widened blocks (``upcast_gemm``): 16 rows 2.8-3.2 /
#: 2.4-2.8, 32 rows 1.4-1.6 / 1.8-1.9. The broadcast tiles then ran 16 rows at 7.4-9.6 GB/s in fp32 and 3.6-4.4
#: in bf16. The limits come from whole layers (the one-call native layer against the expert loop on torch's
#: kernels, interleaved, ms): fp32 Qwen3 T=256 (16 rows an expert) 327 at limit 16 against 534 at 8, OLMoE
#: T=256 (32 rows) 439 at 32 against 493 at 16, Mixtral T=256 (64 rows) 782 at 64 against 657 at 32; bf16
#: Qwen3 T=256 347 against 742, OLMoE T=256 402 at 32 against 667 at 16; 64 rows: Qwen3 T=1024 1893 at 64
#: against 1494, Mixtral T=256 708 against 823 in that A/B but 1205 against 820-860 in the benchmark's own
#: process (``bench_infer.py``; the kernels alone agree: 64 rows native 0.7-1.1 GB/s, fp32 blocks 1.0-1.1),
#: so 32. Packed fp32: OLMoE T=256 443 at 32 against 453 at 16 (level), Qwen3 T=256 322 at 32 against 432 at 8.
#: fp16 (no oneDNN fp16 here: torch's fp16 GEMM is a reference loop, and moekit's alternative from 4 rows the
#: fp32 GEMM on widened blocks) runs the dot tiles with F16C widening, at the bf16 rates: Qwen3 / Mixtral
#: matrices 1 row 16.8-23.5 GB/s against F.linear's 10.8-11.3, 4 rows 11.9-13.9 against the blocks' 3.5-4.5, 16
#: rows 3.6-3.9 against 2.8-2.9, 32 rows 1.7-1.8 against 1.8-1.9. Whole fp16 layers, the one-call layer against
#: the expert loop (ms, interleaved): Qwen3 T=1 4.5 / 10.7, T=64 (4 rows) 94 / 336, T=256 (16) 321 / 731;
#: Mixtral T=16 (4) 52 / 157, T=128 (32) 381 / 635, T=256 (64) 768 / 769; OLMoE T=256 (32) 418 / 599: so 32.
MAX_ROWS["AuthenticAMD+AVX2"] = {
    (torch.float32, False): ((1, 32),),
    (torch.float32, True): ((1, 32),),
    (torch.bfloat16, False): ((1, 32),),
    (torch.bfloat16, True): ((1, 32),),
    (torch.float16, False): ((1, 32),),
}
#: Intel with AVX2 only (client cores, older Xeons): not measured. Decode rows only, up to the 4 where the dot
#: tiles led torch's kernels on every CPU measured (fp32, bf16 and fp16; without oneDNN bf16 / fp16 the
#: alternative is a reference loop or the widened blocks, 2-4x slower at 1-4 rows on the AVX2 AMD EPYC).
#: Intel's AVX-512 profiles have no fp16 rows: not measured there (from Sapphire Rapids oneDNN has fp16 kernels).
MAX_ROWS["GenuineIntel+AVX2"] = {key: ((1, 4),) for key in MAX_ROWS["AuthenticAMD+AVX2"]}
#: where the one-call layer over panel copies (``pack_panels``; a packed bank on a CPU whose kernel reads
#: them, ``panels_available``) beats the expert loop on the packed bank's kernels, as ``MAX_ROWS``: ``dtype ->
#: ((min features, max rows), ...)`` by ``cpu_profile``. Measured on whole layers, interleaved in one process,
#: 1 thread, the loop's time over the panels' (AVX2 AMD EPYC, after the tail tiles and the bf16 tiles widened
#: in the previous tile's pass; fp32 loop: oneDNN-packed / MKL, bf16: the fp32 GEMM on widened blocks): fp32
#: Qwen3 16 rows 1.31, 32 1.43, 64 1.18, 128 1.11, 256 0.74; OLMoE 128 1.59, 256 0.94, 512 0.83; Mixtral
#: (3584-4096 features) 256 1.09, 512 1.09, 1024 0.79. bf16 Qwen3 32 1.55, 64 1.43, 128 1.14, 256 0.98; OLMoE
#: 128 1.31, 256 1.07, 512 0.88; Mixtral 256 1.23, 512 1.15-1.21, 1024 0.69-0.76. Past these sizes a tile's
#: pass over every row of x^T (16 rows x I a pass) leaves L2, and the GEMM libraries' blocking wins. fp16 runs
#: bf16's panel tiles (F16C widening; loop: the fp32 GEMM on widened blocks): Qwen3 16 rows 2.44, 32 1.81, 64
#: 1.37, 128 1.13; OLMoE 128 1.27, 256 1.14, 512 1.08; Mixtral 256 1.26, 512 1.14, 1024 0.83: bf16's limits.
PANEL_MAX_ROWS = {
    "AuthenticAMD+AVX2": {dtype: ((3584, 512), (1, 128)) for dtype in (torch.float32, torch.bfloat16, torch.float16)},
}


def available() -> bool:
    """Whether the kernel can run here: not turned off (``MOEKIT_NATIVE_GEMV=0``) and built (once)."""
    return os.environ.get("MOEKIT_NATIVE_GEMV", "1") != "0" and _library() is not None


def serves(rows: int, dtype: torch.dtype, features: int, *, packed: bool = False, panels: bool = False) -> bool:
    """Whether ``linear`` should run a product of ``rows`` rows of ``features`` inputs in ``dtype``
    rather than torch (``packed``: torch's alternative is a oneDNN-packed weight; ``panels``: the kernel
    reads panel copies, against the packed bank's expert loop). The one place of the measured crossover
    (``MAX_ROWS`` / ``PANEL_MAX_ROWS`` of this CPU's profile)."""
    if not available() or dtype not in dtypes():
        return False
    table = PANEL_MAX_ROWS.get(cpu_profile(), {}).get(dtype, ()) if panels else MAX_ROWS.get(cpu_profile(), {}).get((dtype, packed), ())
    for min_features, limit in table:
        if features >= min_features:
            return 1 <= rows <= limit
    return False


def dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the built kernel takes: fp32 and bf16, and fp16 where it was built with F16C (every
    x86 CPU with AVX2); empty when the kernel is unavailable."""
    lib = _library()
    if lib is None:
        return ()
    return tuple(dt for dt, code in _DTYPES.items() if lib.moekit_dtype_usable(code))


def _dtype_code(dtype: torch.dtype, named: dict[str, torch.dtype]) -> int:
    """The kernel's code of ``dtype``, which every one of ``named`` (argument name -> dtype) must share; a
    ValueError that names them and the dtypes this build takes otherwise."""
    served = dtypes()
    if dtype not in served or any(dt != dtype for dt in named.values()):
        allowed = ", ".join(str(dt).removeprefix("torch.") for dt in served)
        got = ", ".join(f"{name} {str(dt).removeprefix('torch.')}" for name, dt in named.items())
        raise ValueError(f"{', '.join(named)} must all be one dtype of {allowed} (this build of the kernel), got {got}")
    return _DTYPES[dtype]


def linear(x_MI: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None, *, glu: str | None = None,
           threads: int | None = None) -> Tensor:  # fmt: skip
    """``x W^T + b``: ``[M, I] x [O, I] -> [M, O]``; with ``glu`` (a ``GLU_ACTIVATIONS`` name) ``W`` is
    ``[gate; up]`` (``[2F, I]``) and the result ``act(x Wg^T + bg) * (x Wu^T + bu)``, ``[M, F]``.

    CPU tensors, one dtype of ``dtypes()`` (fp32, bf16, fp16 with F16C); ``weight_OI`` with unit column stride
    (rows may be strided).
    ``threads`` defaults to ``torch.get_num_threads()`` of the calling thread. Runs whether or not
    ``MOEKIT_NATIVE_GEMV`` turns the routing off (``serves``); raises ``RuntimeError`` when the kernel
    could not be built.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native GEMV kernel is not available: {_built()[1]}")
    dtype, (M, I), (O2, I2) = weight_OI.dtype, x_MI.shape, weight_OI.shape
    named = {"x_MI": x_MI.dtype, "weight_OI": dtype, **({} if bias_O is None else {"bias_O": bias_O.dtype})}
    code = _dtype_code(dtype, named)
    if I != I2 or weight_OI.stride(1) != 1 or weight_OI.device.type != "cpu" or x_MI.device.type != "cpu":
        raise ValueError(f"x [M, I] and weight [O, I] must be CPU tensors that agree on I, the weight with unit "
                         f"column stride; got {tuple(x_MI.shape)} and {tuple(weight_OI.shape)}, strides {weight_OI.stride()}")  # fmt: skip
    act = 0 if glu is None else GLU_ACTIVATIONS.get(glu, -1)
    if act < 0 or (glu is not None and O2 % 2):
        raise ValueError(f"glu must be one of {list(GLU_ACTIVATIONS)} with an even number of weight rows, "
                         f"got {glu!r} and {O2} rows")  # fmt: skip
    x = x_MI if x_MI.stride(1) == 1 else x_MI.contiguous()
    bias = None if bias_O is None else bias_O.contiguous().data_ptr()
    O = O2 // 2 if glu else O2
    y = torch.empty(M, O, dtype=dtype)
    threads = torch.get_num_threads() if threads is None else threads
    with _profiled("moekit::native_gemv"):
        status = lib.moekit_gemv(weight_OI.data_ptr(), O, I, weight_OI.stride(0), x.data_ptr(), M, x.stride(0), bias,
                                 y.data_ptr(), O, code, glu is not None, act, threads)  # fmt: skip
    if status:
        raise MemoryError(f"native GEMV could not allocate its buffers (x: {M * I * 6} bytes)")
    return y


def scratch_limit(nbytes: int | None = None) -> int:
    """How many bytes of working memory (``moe_ffn``'s gathered rows, hidden rows and sums; ``linear``'s copy of
    ``x``) a calling thread keeps between calls, default 256 MiB; returns the limit before the call. A call
    reuses the kept block (fresh pages cost a page fault each: 6-9% of a Qwen3-30B-A3B layer's prefill of 256
    tokens, measured on an AMD EPYC); a call that needs more frees its block afterwards. ``nbytes`` (``>= 0``)
    sets the limit for every thread and at once frees the calling thread's block if it is larger (``0``: keep
    nothing); a thread's block is freed when it exits."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native GEMV kernel is not available: {_built()[1]}")
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"nbytes must be a whole number of bytes >= 0 or None (only read the limit), got {nbytes!r}")
    return int(lib.moekit_scratch_keep(-1 if nbytes is None else nbytes))


def panels_available() -> bool:
    """Whether the kernel here reads panel copies of expert weights (``pack_panels``): the AVX2 build, whose
    broadcast tiles read a tile's weight rows as one stream from them."""
    return available() and bool(_library().moekit_panels_usable())


def pack_panels(w_ERI: Tensor, segment: int | None = None) -> Tensor:
    """The panel copy of expert matrices ``w [E, R, I]`` (CPU, a dtype of ``dtypes()``) that ``moe_ffn`` reads for its
    broadcast-tile products (``first_panels`` / ``second_panels``): a dense tensor of ``w``'s shape and dtype
    whose every tile of 6 (or 4, 2, 1) weight rows holds its values input-major, so the tile streams one run of
    memory instead of 6 rows ``I`` apart (AVX2 AMD EPYC, 16 rows of x: 1.2-1.5x the read rate, ``bench_infer.py
    --kernels``). ``segment``: rows per segment, each cut into the kernel's chunks on its own (a GLU's ``[gate;
    up]``: ``F``; default ``R``). Costs a second copy of the weights; raises where ``panels_available`` is
    False."""
    if not panels_available():
        raise RuntimeError(f"panel copies need the AVX2 build of the native kernel; here: {build_info()['isa'] or _built()[1]}")
    if w_ERI.dtype not in dtypes() or w_ERI.dim() != 3 or w_ERI.device.type != "cpu" or w_ERI.stride(-1) != 1:
        allowed = ", ".join(str(dt).removeprefix("torch.") for dt in dtypes())
        raise ValueError(f"w_ERI must be a CPU tensor [E, R, I] of {allowed} with unit column stride, got "
                         f"{w_ERI.dtype} {tuple(w_ERI.shape)} on {w_ERI.device}, strides {w_ERI.stride()}")  # fmt: skip
    E, R, I = w_ERI.shape
    segment = R if segment is None else segment
    if not 1 <= segment <= R or R % segment:
        raise ValueError(f"segment must divide the {R} rows of w_ERI, got {segment}")
    out = torch.empty(E, R, I, dtype=w_ERI.dtype)
    if _library().moekit_pack_panels(w_ERI.data_ptr(), E, w_ERI.stride(0), R, w_ERI.stride(1), I, segment, out.data_ptr(),
                                     _DTYPES[w_ERI.dtype]):  # fmt: skip
        raise RuntimeError("the native kernel was built without panel copies")
    return out


def moe_ffn(x_TI: Tensor, ids_TK: Tensor, weights_TK: Tensor, first_ERI: Tensor, second_EOF: Tensor,
            first_bias_ER: Tensor | None = None, second_bias_EO: Tensor | None = None, *, kept_TK: Tensor | None = None,
            glu: bool, activation: str, first_panels: Tensor | None = None, second_panels: Tensor | None = None,
            threads: int | None = None) -> Tensor:  # fmt: skip
    """One MoE layer of two-matrix experts for a few tokens, in one native call: ``[T, I] -> [T, O]``,
    ``y_t = sum_k w_tk * (W2_e h + b2_e)`` with ``e = ids[t, k]`` over kept slots and ``h = act(Wg_e x_t +
    bg_e) * (Wu_e x_t + bu_e)`` (``glu``: ``first`` is ``[gate; up]``, ``R = 2F``) or ``act(W1_e x_t + b1_e)``
    (``R = F``).

    Every touched expert's matrices are read from memory once, split over ``threads`` OpenMP threads
    (default ``torch.get_num_threads()``; fewer for small layers): the hidden features, then the output
    rows, each thread a contiguous range. ``first_ERI [E, R, I]`` and ``second_EOF [E, O, F]`` (any expert
    and row strides, unit column stride), biases ``[E, R]`` / ``[E, O]``, ``x_TI`` in one dtype of ``dtypes()``
    (fp32, bf16, fp16 with F16C); ``ids_TK`` integer ids in ``[0, E)``, ``weights_TK`` any float dtype (used in
    fp32), ``kept_TK`` an optional bool mask of live slots. ``activation``: a ``FFN_ACTIVATIONS`` name. Sums in
    fp32; bf16 and fp16 round ``h`` (as the expert-by-expert path does) and ``y``. ``first_panels`` /
    ``second_panels``: both or neither, ``pack_panels(first, F if glu else None)`` and
    ``pack_panels(second)`` of these weights; the products that run on the broadcast tiles then read them (same
    results: the same sums in the same order).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native GEMV kernel is not available: {_built()[1]}")
    dtype = first_ERI.dtype
    biases = [b for b in (first_bias_ER, second_bias_EO) if b is not None]
    named = {"x_TI": x_TI.dtype, "first_ERI": dtype, "second_EOF": second_EOF.dtype,
             **{name: b.dtype for name, b in (("first_bias_ER", first_bias_ER), ("second_bias_EO", second_bias_EO)) if b is not None}}  # fmt: skip
    code = _dtype_code(dtype, named)
    (T, I), (E, R, I1), (E2, O, F) = x_TI.shape, first_ERI.shape, second_EOF.shape
    if I1 != I or E2 != E or R != (2 * F if glu else F):
        raise ValueError(f"first [E, {'2F' if glu else 'F'}, I] and second [E, O, F] must agree with x [T, I]; got x "
                         f"{tuple(x_TI.shape)}, first {tuple(first_ERI.shape)}, second {tuple(second_EOF.shape)}")  # fmt: skip
    for name, t, shape in (("first_bias_ER", first_bias_ER, (E, R)), ("second_bias_EO", second_bias_EO, (E, O))):
        if t is not None and (tuple(t.shape) != shape or t.stride(-1) != 1):
            raise ValueError(f"{name} must be {list(shape)} with unit column stride, got {tuple(t.shape)}, strides {t.stride()}")
    tensors = (x_TI, first_ERI, second_EOF, *biases)
    if any(t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors[1:]) or x_TI.device.type != "cpu":
        raise ValueError("moe_ffn runs CPU tensors whose weights have unit column stride")
    if ids_TK.shape != (T, ids_TK.shape[1]) or weights_TK.shape != ids_TK.shape or ids_TK.is_floating_point():
        raise ValueError(f"ids_TK must be integer [T, K] and weights_TK [T, K] with T = {T}; got "
                         f"{tuple(ids_TK.shape)} ({ids_TK.dtype}) and {tuple(weights_TK.shape)}")  # fmt: skip
    act = FFN_ACTIVATIONS.get(activation)
    if act is None:
        raise ValueError(f"activation must be one of {list(FFN_ACTIVATIONS)}, got {activation!r}")
    if (first_panels is None) != (second_panels is None):
        raise ValueError("first_panels and second_panels go together (pack_panels of both matrices) or not at all")
    for name, panel, like in (("first_panels", first_panels, first_ERI), ("second_panels", second_panels, second_EOF)):
        if panel is not None and (panel.shape != like.shape or panel.dtype != dtype or not panel.is_contiguous()
                                  or panel.device.type != "cpu"):  # fmt: skip
            raise ValueError(f"{name} must be pack_panels of its matrix: contiguous {dtype} {tuple(like.shape)} on CPU, got "
                             f"{panel.dtype} {tuple(panel.shape)} on {panel.device}")  # fmt: skip
    K = ids_TK.shape[1]
    x = x_TI if x_TI.stride(1) == 1 else x_TI.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    weights = weights_TK.to(torch.float32).contiguous()
    kept = None if kept_TK is None else kept_TK.to(torch.uint8).contiguous()
    y = torch.empty(T, O, dtype=dtype)

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    b1_stride = 0 if first_bias_ER is None else first_bias_ER.stride(0)
    b2_stride = 0 if second_bias_EO is None else second_bias_EO.stride(0)
    threads = torch.get_num_threads() if threads is None else threads
    with _profiled("moekit::native_moe_ffn"):
        status = lib.moekit_moe_ffn(first_ERI.data_ptr(), first_ERI.stride(0), first_ERI.stride(1), ptr(first_bias_ER), b1_stride,
                                    second_EOF.data_ptr(), second_EOF.stride(0), second_EOF.stride(1), ptr(second_bias_EO), b2_stride,
                                    ptr(first_panels), ptr(second_panels), F, I, O, E, x.data_ptr(), T, x.stride(0), ids.data_ptr(), weights.data_ptr(), ptr(kept), K,
                                    y.data_ptr(), code, glu, act, threads)  # fmt: skip
    if status == -2:
        raise ValueError(f"ids_TK must lie in [0, {E}), got values from {int(ids.min())} to {int(ids.max())}")
    if status:
        raise MemoryError(f"native MoE layer could not allocate its buffers ({T * K} slots of {I} + {F} values)")
    return y


def merged_available() -> bool:
    """Whether SMEAR's merged products (``merged_forward``, ``merged_grad_input``, ``merged_grad_weights``)
    run natively here: the kernel is available and was built with AVX-512 (their broadcast tiles)."""
    return available() and bool(_library().moekit_merged_usable())


def _merged_operands(**tensors: Tensor) -> tuple[ctypes.CDLL, dict[str, Tensor]]:
    """The library and ``tensors`` as contiguous fp32 CPU tensors (the merged products' layout), or an error
    that names the offending argument."""
    if not merged_available():
        raise RuntimeError(f"the native merged products are not available here (kernel: {_built()[1] or 'built without AVX-512'})")
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    return _library(), {name: t.contiguous() for name, t in tensors.items()}


def _merged_shapes(x_GS_: Tensor, probs_GE: Tensor, w_EOI: Tensor, what: str, features: int) -> tuple[int, int, int, int]:
    """``(G, S, E, width)`` after checking ``x`` ``[G, S, features]`` against ``probs [G, E]`` and ``w [E, O, I]``."""
    if x_GS_.dim() != 3 or probs_GE.dim() != 2 or w_EOI.dim() != 3:
        raise ValueError(f"{what} [G, S, n], probs [G, E] and w [E, O, I] expected, got {tuple(x_GS_.shape)}, "
                         f"{tuple(probs_GE.shape)}, {tuple(w_EOI.shape)}")  # fmt: skip
    G, S, n = x_GS_.shape
    if probs_GE.shape != (G, w_EOI.shape[0]) or n != features:
        raise ValueError(f"{what} {tuple(x_GS_.shape)}, probs {tuple(probs_GE.shape)} and w {tuple(w_EOI.shape)} disagree "
                         f"(want probs [G, E] and {what}'s last dimension {features})")  # fmt: skip
    return G, S, w_EOI.shape[0], n


def merged_forward(x_GSI: Tensor, probs_GE: Tensor, w_EOI: Tensor, b_EO: Tensor | None = None, *, threads: int | None = None) -> Tensor:
    """SMEAR's merged linear map in one native call: ``y_g = x_g W_g^T + b_g`` with ``W_g = sum_e probs[g, e]
    w_e`` (``b_g`` alike), ``[G, S, I] -> [G, S, O]``; the G merged copies are never held (blocks of 64
    output features are merged for every group, then run on the broadcast tiles). fp32 CPU tensors."""
    lib, t = _merged_operands(x=x_GSI, probs=probs_GE, w=w_EOI, **({} if b_EO is None else {"b": b_EO}))
    E, O, I = w_EOI.shape
    G, S, _, _ = _merged_shapes(x_GSI, probs_GE, w_EOI, "x", I)
    if b_EO is not None and b_EO.shape != (E, O):
        raise ValueError(f"b must be [E, O] = [{E}, {O}], got {tuple(b_EO.shape)}")
    y = torch.empty(G, S, O)
    with _profiled("moekit::native_merged"):
        status = lib.moekit_merged_linear(t["x"].data_ptr(), G, S, I, t["probs"].data_ptr(), E, t["w"].data_ptr(), O,
                                          None if b_EO is None else t["b"].data_ptr(), y.data_ptr(), _threads(threads))  # fmt: skip
    _check_status(status, "merged_forward")
    return y


def merged_grad_input(grad_GSO: Tensor, probs_GE: Tensor, w_EOI: Tensor, *, threads: int | None = None) -> Tensor:
    """The gradient of ``merged_forward`` with respect to ``x``: ``grad_y_g W_g``, ``[G, S, O] -> [G, S, I]``."""
    lib, t = _merged_operands(grad=grad_GSO, probs=probs_GE, w=w_EOI)
    E, O, I = w_EOI.shape
    G, S, _, _ = _merged_shapes(grad_GSO, probs_GE, w_EOI, "grad", O)
    gx = torch.empty(G, S, I)
    with _profiled("moekit::native_merged"):
        status = lib.moekit_merged_linear_grad_x(t["grad"].data_ptr(), G, S, O, t["probs"].data_ptr(), E, t["w"].data_ptr(),
                                                 I, gx.data_ptr(), _threads(threads))  # fmt: skip
    _check_status(status, "merged_grad_input")
    return gx


def merged_grad_weights(x_GSI: Tensor, grad_GSO: Tensor, probs_GE: Tensor, w_EOI: Tensor, *, want_w: bool = True,
                        want_probs: bool = True, threads: int | None = None) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """The gradients of ``merged_forward`` with respect to ``w`` (``[E, O, I]``, ``sum_g probs[g, e] grad_W_g``)
    and ``probs`` (``[G, E]``, ``<grad_W_g, w_e>``; without the bias's part) through ``grad_W_g = grad_y_g^T x_g``,
    which is never stored: both come from each tile's accumulators. ``(grad_w, grad_probs)``, None where not wanted."""
    lib, t = _merged_operands(x=x_GSI, grad=grad_GSO, probs=probs_GE, w=w_EOI)
    E, O, I = w_EOI.shape
    G, S, _, _ = _merged_shapes(x_GSI, probs_GE, w_EOI, "x", I)
    if grad_GSO.shape != (G, S, O):
        raise ValueError(f"grad must be [G, S, O] = [{G}, {S}, {O}], got {tuple(grad_GSO.shape)}")
    gw = torch.empty(E, O, I) if want_w else None
    gp = torch.zeros(G, E) if want_probs else None
    with _profiled("moekit::native_merged"):
        status = lib.moekit_merged_linear_grad_w(t["x"].data_ptr(), t["grad"].data_ptr(), G, S, I, O, t["probs"].data_ptr(), E,
                                                 t["w"].data_ptr(), None if gw is None else gw.data_ptr(),
                                                 None if gp is None else gp.data_ptr(), _threads(threads))  # fmt: skip
    _check_status(status, "merged_grad_weights")
    return gw, gp


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else threads


def _check_status(status: int, what: str) -> None:
    if status:
        raise MemoryError(f"{what}: the native kernel could not allocate its buffers")


def _profiled(name: str) -> contextlib.AbstractContextManager:
    """A named range around a native call while a torch profiler runs (its C time is otherwise invisible to
    the profiler); nothing otherwise (``record_function`` costs ~10 us a call, a fifth of a decode product)."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def build_info() -> dict[str, str | bool | None]:
    """What was built: ``{"library": path or None, "isa": "avx512f+bf16" | "avx512f" | "avx2" | "portable" | None,
    "amx": whether bf16 products of 5 or more rows run on the AMX tile unit, "reason": why not built or None}``
    (for the benchmark's report)."""
    lib = _library()
    return {"library": None if lib is None else lib._name, "isa": None if lib is None else lib.moekit_gemv_isa().decode(),
            "amx": lib is not None and bool(lib.moekit_amx_usable()), "reason": _built()[1]}  # fmt: skip


# ----- build and load ---------------------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE") or Path.home() / ".cache" / "moekit")


def _compiler() -> str | None:
    """The C compiler: ``$CC`` or ``cc`` on the PATH, or None."""
    return shutil.which(os.environ.get("CC", "cc"))


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id (``/proc/cpuinfo``, e.g. ``GenuineIntel``, ``AuthenticAMD``; elsewhere
    ``platform.processor()``). Reads no library: callers that only pick between torch's kernels use it."""
    return _cpuinfo("vendor_id") or platform.processor()


@functools.cache
def cpu_profile() -> str:
    """Which row of ``MAX_ROWS`` applies: ``cpu_vendor()``, with ``+AMX`` where the built kernel runs bf16
    on AMX tiles, ``+AVX2`` where it was built for AVX2 (no AVX-512: narrower tiles, other crossovers) and
    ``+portable`` where for neither (scalar C: no table, torch's kernels)."""
    lib = _library()
    if lib is None:
        return cpu_vendor()
    isa = lib.moekit_gemv_isa().decode()
    if lib.moekit_amx_usable():
        return cpu_vendor() + "+AMX"
    return cpu_vendor() + ("" if isa.startswith("avx512") else "+AVX2" if isa == "avx2" else "+portable")


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of ``/proc/cpuinfo``, or None (no such file or line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``; elsewhere the processor name): part of the cache key,
    since ``-march=native`` builds for this CPU only."""
    return _cpuinfo("flags") or f"{platform.machine()} {platform.processor()}"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (with one warning) when it cannot be built."""
    path, reason = _built()
    if path is None:
        warnings.warn(f"moekit's native GEMV kernel is unavailable ({reason}); decode uses torch's "
                      "kernels (set MOEKIT_NATIVE_GEMV=0 to skip the build)", RuntimeWarning, stacklevel=3)  # fmt: skip
        return None
    return load(path)


def load(path: str | os.PathLike[str]) -> ctypes.CDLL:
    """A build of ``native_gemv.c`` at ``path``, its entry points declared (``benchmarks/ab_native.py``
    loads two builds side by side this way)."""
    lib = ctypes.CDLL(str(path))
    lib.moekit_gemv.restype = ctypes.c_int
    L, P, I = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    lib.moekit_gemv.argtypes = [P, L, L, L, P, L, L, P, P, L, I, I, I, I]
    lib.moekit_moe_ffn.restype = ctypes.c_int
    panels = hasattr(lib, "moekit_pack_panels")  # a build of an earlier revision (ab_native.py) has no panel copies
    lib.moekit_moe_ffn.argtypes = [P, L, L, P, L, P, L, L, P, L, *([P, P] if panels else []), L, L, L, L, P, L, L, P, P, P, L,
                                   P, I, I, I, I]  # fmt: skip
    if panels:
        lib.moekit_panels_usable.restype = ctypes.c_int
        lib.moekit_pack_panels.restype = ctypes.c_int
        lib.moekit_pack_panels.argtypes = [P, L, L, L, L, L, L, P, I]
    if hasattr(lib, "moekit_scratch_keep"):
        lib.moekit_scratch_keep.restype = L
        lib.moekit_scratch_keep.argtypes = [L]
    lib.moekit_merged_usable.restype = ctypes.c_int
    lib.moekit_merged_linear.argtypes = [P, L, L, L, P, L, P, L, P, P, I]
    lib.moekit_merged_linear_grad_x.argtypes = [P, L, L, L, P, L, P, L, P, I]
    lib.moekit_merged_linear_grad_w.argtypes = [P, P, L, L, L, L, P, L, P, P, P, I]
    if hasattr(lib, "moekit_dtype_usable"):
        lib.moekit_dtype_usable.restype = ctypes.c_int
        lib.moekit_dtype_usable.argtypes = [I]
    lib.moekit_gemv_isa.restype = ctypes.c_char_p
    lib.moekit_amx_usable.restype = ctypes.c_int
    return lib


def _first_error(stderr: str) -> str | None:
    """The compiler's first error line (its last lines are often a caret or a note), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line), lines[-1] if lines else None)


@functools.cache
def _built() -> tuple[Path | None, str | None]:
    """``(path of the cached library, None)``, compiling it if absent, or ``(None, why not)``."""
    cc = _compiler()
    if cc is None:
        return None, f"no C compiler found ({os.environ.get('CC', 'cc')!r} is not on the PATH)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{cc} --version failed: {err}"
    source = SOURCE.read_bytes()
    attempts = [(*FLAGS, "-fopenmp"), FLAGS]  # without OpenMP the kernel runs on one thread
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(attempts[0]).encode(), _cpu_flags().encode()]))
    target = _cache_dir() / f"native_gemv-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target, None
    errors = []
    for flags in attempts:
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".native_gemv-", suffix=".so", dir=target.parent)
            os.close(fd)
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: a parallel build of the same key writes the same bytes
                return target, None
            errors.append(_first_error(done.stderr) or f"exit status {done.returncode}")
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err))
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return None, f"{cc} failed: {errors[-1]}"
