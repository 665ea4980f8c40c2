"""Inference (forward-only) time of the experts of one MoE layer: moekit vs transformers' experts
implementations vs the memory-bandwidth and dense-GEMM bounds, at decode and prefill sizes.

Layers: Qwen3-30B-A3B-shaped (D=2048, F=768, E=128, K=8), Mixtral-8x7B-shaped with F cut to a quarter
(D=4096, F=3584, E=8, K=2: the full F is 5.6 GB of fp32 per layer, more than this shared machine can hold
twice) and OLMoE-1B-7B-shaped (D=2048, F=1024, E=64, K=8) SwiGLU experts; tokens T = 1, 4, 16 (decode)
and 256, 1024, 4096 (prefill); fp32 and bf16 (fp16 on request: ``--dtypes fp16``). Every implementation runs
the *experts* on identical
weights (one copy in memory, shared) and identical routing (moekit's top-k router, run once per T), under
``torch.inference_mode``; the router is the same small product for all and is left out.

* **moekit**: ``moekit.experts.dispatch`` (its forward-only path: the touched experts in a loop, their
  decode-sized products on the native GEMV where ``native_gemv.serves`` them, the sorted grouped GEMM
  above that);
* **moekit_packed**: the same after ``moekit.experts.pack_for_inference`` (oneDNN-blocked copies of the
  expert weights);
* **hf_eager / hf_grouped_mm / hf_batched_mm**: transformers' ``MixtralExperts`` with each CPU experts
  implementation (``batched_mm`` copies the weights per routed token; skipped above ``--max-gather-gb``);
* **bandwidth bound**: bytes of the experts the routing touches / read bandwidth, the bandwidth being the
  fastest of four reads of a 256 MB buffer timed in the same rounds (``torch.sum`` of fp32 values, and
  one dense GEMV over a matrix of that size, plain, oneDNN-packed and native, in the tested dtype);
* **dense-GEMM bound**: one expert's gate/up, SwiGLU and down over all T*K routed rows (the MoE's FLOPs
  with no routing), the faster of plain ``F.linear`` and oneDNN-packed weights (bf16 on a CPU where
  oneDNN has no bf16 kernels, AVX2: the chain on fp32 copies of the weights instead, fp32 BLAS being the
  fastest product the CPU has and torch's bf16 GEMM a reference loop, from ``DENSE_FP32_MIN_ROWS`` routed
  rows; packing is left out there);
* **bound** = the larger of the two; "x bound" = time / bound.
* **per-expert floor** (the summary's last column): each touched expert's weights read at the bandwidth or
  its routed rows' multiply-adds at the core's in-cache GEMM rate (``PEAK_MM``: products whose operands stay
  in L2/L3, in the compute dtype of the dense bound), whichever is longer, summed over the experts -- what no kernel
  beats when an expert's rows need more multiply-adds per byte than the core has (bf16 on AVX2, where
  every weight costs one fp32 FMA per row of x: from about 4 rows an expert).

Timing interleaves the contenders (one call of each per round) and keeps the best of ``--reps`` rounds
(medians in the JSON; prefill below 4096 tokens: ``max(4, reps // 2)`` rounds after two warm-up calls each
-- on this shared VM a prefill call varies by 10-20% from call to call, and the calls right after a first one
ran up to 1.6x slower; 4096 tokens: 2 rounds): process CPU time at one thread (it leaves out time spent waiting for a core that
another process holds), wall time with more threads. Outputs are compared with moekit's.

An end-to-end number follows: tokens/s of greedy ``generate`` on tiny-config Qwen3-MoE and Mixtral models
(random weights) with transformers' experts implementations vs moekit's, selected through the registry
(``experts_implementation="moekit"``), with the generated tokens compared to ``eager``'s.

    python benchmarks/bench_infer.py                 # -> results/bench_infer.{json,md}, 1 thread
    python benchmarks/bench_infer.py --threads 2     # -> results/bench_infer_2threads.{json,md}
    python benchmarks/bench_infer.py --kernels       # read rate: native GEMV, F.linear, packed, torch.sum -> results/bench_infer_kernels.*
    python benchmarks/bench_infer.py --quick         # tiny shapes (smoke test) -> results/bench_infer_quick.*

On a shared machine, run it in pieces (``--shapes``, ``--dtypes``, ``--no-generate``, each into its own
``--out``; every piece records its load average) and combine them with ``--assemble PIECE.json ...``.
``--profile`` adds, for every size where moekit misses its goal, the top ops of one of its calls.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = {
    "qwen3_30b_a3b": dict(D=2048, F=768, E=128, K=8),
    "mixtral_8x7b_quarter_f": dict(D=4096, F=3584, E=8, K=2),
    "olmoe_1b_7b": dict(D=2048, F=1024, E=64, K=8),
}
#: the models the shapes come from, for the README's grid
LAYER_NAMES = {"qwen3_30b_a3b": "Qwen3-30B-A3B", "mixtral_8x7b_quarter_f": "Mixtral-8x7B (F/4)", "olmoe_1b_7b": "OLMoE-1B-7B"}
QUICK = {"tiny": dict(D=64, F=128, E=8, K=2)}
TOKENS = [1, 4, 16, 256, 1024, 4096]
QUICK_TOKENS = [1, 4, 64]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["moekit", "moekit_packed", "hf_eager", "hf_grouped_mm", "hf_batched_mm"]
BOUNDS = ["bw_sum", "bw_gemv", "bw_gemv_packed", "bw_gemv_native", "dense", "dense_packed", "dense_fp32"]
DECODE_GOAL, PREFILL_GOAL = 1.15, 1.15
TOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 4e-3}
BW_BYTES = 256 * 2**20
#: the in-cache GEMM that measures the core's multiply-add rate: [M, K] x [K, N] into one output (fp32: 1.25 MB
#: with it), the fastest of PEAK_CALLS calls (AVX2 AMD EPYC, MKL: 45.9 GMAC/s, 256^3 to 4096 x 2048 x 1536 within
#: 0.91-1.02x; timed among the contenders, each call after a cache flush, it read 35-46 from run to run), measured
#: at every size and the fastest so far kept (Layer.measure_peak)
PEAK_MM, PEAK_CALLS = (512, 256, 256), 64
#: routed rows from which the bf16 dense-GEMM bound on fp32 copies counts (CPUs without oneDNN bf16): from 64
#: rows that chain does 32 FLOP per fp32 weight byte, far past a core's balance; below, its time is the read
#: of the fp32 copies, twice the bf16 bytes the bandwidth bound stands for, and the bound is the bandwidth's
DENSE_FP32_MIN_ROWS = 64


def _weights(shape: dict, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, Fh, E = shape["D"], shape["F"], shape["E"]
    gate_up = torch.empty(E, 2 * Fh, D, dtype=dtype)
    down = torch.empty(E, D, Fh, dtype=dtype)
    for e in range(E):  # expert by expert: no fp32 copy of a whole bf16 bank
        gate_up[e] = torch.randn(2 * Fh, D, generator=g) / D**0.5
        down[e] = torch.randn(D, Fh, generator=g) / Fh**0.5
    router = torch.randn(E, D, generator=g) / D**0.5
    return gate_up, down, router


class Layer:
    """One shape in one dtype: the weights once, every implementation and bound built on them."""

    def __init__(self, shape: dict, dtype: torch.dtype) -> None:
        import moekit
        from moekit.experts import pack_for_inference, upcast_gemm
        from moekit.experts.inference import packing_available

        self.shape, self.dtype = shape, dtype
        D, Fh, E, K = shape["D"], shape["F"], shape["E"], shape["K"]
        gate_up, down, router_w = _weights(shape, dtype)
        self.router = moekit.TopKRouter(D, E, K, noisy=False)
        with torch.no_grad():
            self.router.gate.weight.copy_(router_w)
        self.banks = {}
        for name in ("moekit", "moekit_packed"):
            bank = moekit.GLUExperts(E, D, Fh, device="meta", dtype=dtype)
            bank.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
            bank.down_proj = torch.nn.Parameter(down, requires_grad=False)
            self.banks[name] = bank
        pack_for_inference(self.banks["moekit_packed"])
        self.hf = {impl: self._hf_experts(impl.removeprefix("hf_"), gate_up, down) for impl in IMPLS if impl.startswith("hf_")}
        self.expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
        self.dense_gu, self.dense_down = gate_up[0], down[0]
        # bf16 / fp16 where torch's GEMM in them is its reference loop (AVX2): the dense chain on fp32 BLAS is the
        # real compute bound (the fp32 copies made here, outside the timing: a bound, not a contender)
        self.dense_fp32 = (gate_up[0].float(), down[0].float()) if upcast_gemm.torch_gemm_is_reference(dtype) else None
        self.packs = packing_available(dtype, "cpu")  # oneDNN packs bf16 only where the CPU has bf16 instructions
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.dense_packed = [reorder(w.contiguous(), 64) for w in (gate_up[0], down[0])] if self.packs else None
        rows = BW_BYTES // (4096 * gate_up.element_size())
        self.bw_fp32 = torch.randn(BW_BYTES // 4)
        self.bw_matrix = torch.randn(rows, 4096).to(dtype)
        self.bw_matrix_packed = reorder(self.bw_matrix, 64) if self.packs else None
        self.bw_x = torch.randn(1, 4096).to(dtype)
        self.macs_per_row = 3 * D * Fh  # gate/up (2F x D) and down (D x F) for one routed row
        self.peak_dtype = torch.float32 if self.dense_fp32 is not None else dtype
        self.mm_peak = 0.0

    def to_huge_pages(self) -> None:
        """Move the weights every contender reads (and the bounds' buffers) onto transparent huge pages, in one
        ``moekit.experts.to_huge_pages`` call so that tensors sharing memory keep sharing it; the oneDNN-packed
        copies stay where they are (opaque tensors)."""
        from moekit.experts import to_huge_pages

        holder = torch.nn.Module()
        holder.banks, holder.hf = torch.nn.ModuleDict(self.banks), torch.nn.ModuleDict(self.hf)
        names = ("bw_fp32", "bw_matrix", "dense_gu", "dense_down")
        for name in names:
            holder.register_buffer(name, getattr(self, name))
        to_huge_pages(holder, min_bytes=1)
        for name in names:
            setattr(self, name, getattr(holder, name))

    def measure_peak(self) -> float:
        """The in-cache GEMM rate (multiply-adds / s), measured again and kept at the fastest seen so far (one
        measurement read 35-48 GMAC/s on this shared VM; the fastest is the core's)."""
        self.mm_peak = max(self.mm_peak, _mm_peak(self.peak_dtype))
        return self.mm_peak

    def _hf_experts(self, impl: str, gate_up: torch.Tensor, down: torch.Tensor):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        import moekit.integrations.hf  # noqa: F401  (registers the moekit implementations)

        s = self.shape
        cfg = MixtralConfig(hidden_size=s["D"], intermediate_size=s["F"], num_local_experts=s["E"],
                            num_experts_per_tok=s["K"], experts_implementation=impl)  # fmt: skip
        with torch.device("meta"):
            experts = MixtralExperts(cfg)
        experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        return experts

    def contenders(self, T: int, max_gather_gb: float, seed: int = 1) -> tuple[dict[str, Callable], dict]:
        """``{name: fn}`` for one T (fn returns the experts' output or None) and the routing facts."""
        from moekit.experts import dispatch, native_gemv

        s = self.shape
        g = torch.Generator().manual_seed(seed + T)
        x = torch.randn(T, s["D"], generator=g).to(self.dtype)
        decision = self.router(x.float())
        ids, weights = decision.ids_TK, decision.weights_TK.to(self.dtype)
        from moekit.types import RoutingDecision

        run = RoutingDecision(ids, weights, s["E"])
        rows_per_expert = torch.bincount(ids.flatten(), minlength=s["E"])
        touched = int((rows_per_expert > 0).sum())
        facts = {"touched_experts": touched, "touched_bytes": touched * self.expert_bytes,
                 "expert_rows": [int(n) for n in rows_per_expert if n > 0],
                 "gather_gb": T * s["K"] * self.expert_bytes / 2**30}  # fmt: skip
        fns: dict[str, Callable] = {name: (lambda b=bank: dispatch(b, x, run)) for name, bank in self.banks.items()}
        for impl, module in self.hf.items():
            if impl == "hf_batched_mm" and facts["gather_gb"] > max_gather_gb:
                continue
            fns[impl] = lambda m=module: m(x, ids, weights)
        xk = torch.randn(T * s["K"], s["D"], generator=g).to(self.dtype)
        if self.dense_fp32 is None:
            fns["dense"] = lambda: _none(F.linear(_swiglu(F.linear(xk, self.dense_gu)), self.dense_down))
        elif T * s["K"] >= DENSE_FP32_MIN_ROWS:
            xkf, (gu32, d32) = xk.float(), self.dense_fp32
            fns["dense_fp32"] = lambda: _none(F.linear(_swiglu(F.linear(xkf, gu32)), d32))
        lp = torch.ops.mkldnn._linear_pointwise
        if self.packs:
            pg, pd = self.dense_packed
            fns["dense_packed"] = lambda: _none(lp(_swiglu(lp(xk, pg, None, "none", [], "")), pd, None, "none", [], ""))
            fns["bw_gemv_packed"] = lambda: _none(lp(self.bw_x, self.bw_matrix_packed, None, "none", [], ""))
        fns["bw_sum"] = lambda: _none(self.bw_fp32.sum())
        fns["bw_gemv"] = lambda: _none(F.linear(self.bw_x, self.bw_matrix))
        if native_gemv.available():
            fns["bw_gemv_native"] = lambda: _none(native_gemv.linear(self.bw_x, self.bw_matrix))
        return fns, facts


def _mm_peak(dtype: torch.dtype) -> float:
    """Multiply-adds per second of the in-cache GEMM ``PEAK_MM`` in ``dtype``: the fastest of ``PEAK_CALLS``."""
    m, k, n = PEAK_MM
    a, b, out = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype), torch.empty(m, n, dtype=dtype)
    best = math.inf
    for _ in range(PEAK_CALLS):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return m * k * n / best


def _none(_: object) -> None:
    """Bounds return nothing to compare."""


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


_FLUSH = torch.empty(0)


def flush_caches() -> None:
    """Read 64 MB (twice the L3 of this machine) so that no contender finds another's weights in cache."""
    global _FLUSH
    if _FLUSH.numel() == 0:
        _FLUSH = torch.ones(16 * 2**20)
    _FLUSH.sum()


def time_interleaved(fns: dict[str, Callable], reps: int, clock: Callable[[], float],
                     warmup: int = 1) -> tuple[dict, dict]:
    """``warmup`` untimed calls each (the first one's output kept), then ``reps`` rounds of one call each, the
    caches flushed before every call (the weights are shared by all contenders): best and median."""
    outputs = {name: fn() for name, fn in fns.items()}
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            flush_caches()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    stats = {name: {"best_s": min(ts), "median_s": statistics.median(ts)} for name, ts in times.items()}
    return stats, outputs


def _agree(y: torch.Tensor | None, ref: torch.Tensor, tol: float) -> float | None:
    if y is None:
        return None
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def run_layer(name: str, shape: dict, dtype_name: str, tokens: list[int], args) -> list[dict]:
    dtype = DTYPES[dtype_name]
    layer = Layer(shape, dtype)
    if args.huge_pages:
        layer.to_huge_pages()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    rows = []
    with torch.inference_mode():
        for T in tokens:
            fns, facts = layer.contenders(T, args.max_gather_gb)
            reps, warmup = (args.reps, 1) if T <= 16 else (max(4, args.reps // 2), 2) if T < 4096 else (2, 1)
            stats, outputs = time_interleaved(fns, reps, clock, warmup)
            bw = max(BW_BYTES / stats[k]["best_s"] for k in BOUNDS if k.startswith("bw_") and k in stats)
            bw_bound = facts["touched_bytes"] / bw
            dense = min((stats[k]["best_s"] for k in ("dense", "dense_packed", "dense_fp32") if k in stats), default=0.0)
            bound = max(bw_bound, dense)
            peak = layer.measure_peak()
            floor = sum(max(layer.expert_bytes / bw, n * layer.macs_per_row / peak) for n in facts["expert_rows"])
            ref = outputs["moekit"]
            row = {"layer": name, "dtype": dtype_name, "T": T, **facts, "bandwidth_GBps": bw / 1e9,
                   "bw_bound_s": bw_bound, "dense_bound_s": dense, "bound_s": bound, "mm_peak_GMACs": peak / 1e9,
                   "floor_s": floor,
                   "bound_kind": "bandwidth" if bw_bound >= dense else "dense GEMM", "reps": reps, "impls": {}}  # fmt: skip
            for impl in IMPLS:
                if impl not in stats:
                    row["impls"][impl] = {"skipped": f"would copy {facts['gather_gb']:.1f} GB of per-token weights"}
                    continue
                diff = _agree(outputs[impl], ref, TOL[dtype_name])
                row["impls"][impl] = {**stats[impl], "x_bound": stats[impl]["best_s"] / bound, "max_rel_diff": diff,
                                      "matches_moekit": diff is None or diff <= TOL[dtype_name]}  # fmt: skip
            row["bounds"] = {k: stats[k] for k in BOUNDS if k in stats}
            row["load_average"] = os.getloadavg()
            best = min(("moekit", "moekit_packed"), key=lambda k: row["impls"][k]["best_s"])
            goal = DECODE_GOAL if T <= 16 else PREFILL_GOAL
            if args.profile and row["impls"][best]["x_bound"] > goal:
                row["profile"] = {"impl": best, "top_ops": profile_call(fns[best])}
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
            del fns, outputs
    del layer
    gc.collect()
    return rows


def profile_call(fn: Callable, top: int = 8) -> list[dict]:
    """Where one call's time goes: the ``top`` aten ops and native calls (``moekit::``) by self CPU time
    (torch.profiler), with their share."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "moekit::"))]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in events[:top]]  # fmt: skip


def _line(row: dict) -> str:
    cells = " ".join(f"{k}={v['x_bound']:.2f}" for k, v in row["impls"].items() if "x_bound" in v)
    return (f"{row['layer']} {row['dtype']} T={row['T']}: bound {row['bound_s'] * 1e3:.2f} ms ({row['bound_kind']}, "
            f"{row['bandwidth_GBps']:.1f} GB/s), x bound: {cells}")


# ----- kernels: the read rate of each matrix-vector kernel on expert matrices -------------------------
KERNEL_ROWS = [1, 2, 4, 8, 16, 32, 64]
KERNEL_BYTES = 128 * 2**20  # per measured set of matrices: 4x this machine's L3, so every pass reads memory


def kernel_rates(args) -> dict:
    """Read rate (GB/s) of one decode-sized product per expert matrix, over a set of ``KERNEL_BYTES`` of
    copies of each expert matrix shape (gate/up and down of every layer), by kernel: the native GEMV,
    ``F.linear``, oneDNN packed (bf16 without oneDNN bf16: the fp32 GEMM on widened blocks instead); and
    ``torch.sum`` over the same bytes (the plain read). The profile of where decode time goes, and the
    measurements behind ``native_gemv.MAX_ROWS``."""
    from moekit.experts import native_gemv
    from moekit.experts.inference import packing_available

    shapes = QUICK if args.quick else SHAPES
    clock = time.process_time if args.threads == 1 else time.perf_counter
    budget = KERNEL_BYTES // (16 if args.quick else 1)
    rows_list = [1, 4] if args.quick else KERNEL_ROWS
    out = {"build": native_gemv.build_info(), "rows": []}
    with torch.inference_mode():
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for layer, s in shapes.items():
                for matrix, (O, I) in {"gate_up": (2 * s["F"], s["D"]), "down": (s["D"], s["F"])}.items():
                    n = max(2, budget // (O * I * dtype.itemsize))
                    ws = [torch.randn(O, I).to(dtype) for _ in range(n)]
                    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in ws] if packing_available(dtype, "cpu") else None
                    flat = torch.cat([w.reshape(-1) for w in ws]).float() if dtype == torch.float32 else None
                    nbytes = n * O * I * dtype.itemsize
                    for M in rows_list:
                        x = torch.randn(M, I).to(dtype)
                        fns = _kernel_contenders(x, ws, packed, flat)
                        stats, _ = time_interleaved(fns, args.reps, clock)
                        row = {"dtype": dtype_name, "layer": layer, "matrix": matrix, "O": O, "I": I, "M": M,
                               **{f"{k}_GBps": nbytes / v["best_s"] / 1e9 for k, v in stats.items()}}  # fmt: skip
                        out["rows"].append(row)
                        print(f"kernels {dtype_name} {layer} {matrix} [{O}, {I}] M={M}: "
                              + ", ".join(f"{k} {v['best_s'] and nbytes / v['best_s'] / 1e9:.1f}" for k, v in stats.items())
                              + " GB/s", file=sys.stderr, flush=True)  # fmt: skip
                    ws = packed = flat = None  # free before the next shape's copies
                    gc.collect()
    return out


def _kernel_contenders(x: torch.Tensor, ws: list, packed: list, flat: torch.Tensor | None) -> dict[str, Callable]:
    """One product of ``x`` with every matrix of ``ws`` per kernel (``packed``: the same, oneDNN-blocked; None
    where oneDNN does not pack the dtype here), and ``torch.sum`` over the same fp32 bytes (``flat``; None for
    bf16); bf16 where torch's bf16 GEMM is its reference loop: also the fp32 GEMM on widened blocks
    (``upcast_gemm``, what moekit runs there above the native kernel's rows)."""
    from moekit.experts import native_gemv, upcast_gemm

    lp = torch.ops.mkldnn._linear_pointwise
    fns: dict[str, Callable] = {"F.linear": lambda: [F.linear(x, w) for w in ws]}
    if packed is not None:
        fns["packed"] = lambda: [lp(x, w, None, "none", [], "") for w in packed]
    if upcast_gemm.torch_gemm_is_reference(x.dtype):
        fns["fp32 blocks"] = lambda: [upcast_gemm.linear_via_fp32(x, w) for w in ws]
    if native_gemv.available():
        fns["native"] = lambda: [native_gemv.linear(x, w) for w in ws]
    if flat is not None:
        fns["torch.sum"] = lambda: flat.sum()
    return fns


def kernels_markdown(res: dict, args) -> str:
    """The read-rate table, with each kernel's rate relative to ``torch.sum`` (fp32) and the winner."""
    build = res["build"]
    lines = [f"Read rate of one product per expert matrix (GB/s, best of {args.reps}), {args.threads} thread(s); "
             f"native GEMV: {build['isa'] or 'not built: ' + str(build['reason'])}. `x sum`: rate / torch.sum's "
             "rate over the same fp32 bytes (bf16 rows: over the fp32 read of the same layer and matrix).", "",
             "| dtype | layer | matrix [O, I] | rows | native | F.linear | packed | fp32 blocks | torch.sum | "
             "native x sum | F.linear x sum | packed x sum | fp32 blocks x sum | fastest |",
             "|" + "---|" * 14]  # fmt: skip
    sums = {(r["layer"], r["matrix"], r["M"]): r["torch.sum_GBps"] for r in res["rows"] if "torch.sum_GBps" in r}
    for r in res["rows"]:
        ref = sums.get((r["layer"], r["matrix"], r["M"]))
        rates = {k: r.get(f"{k}_GBps") for k in ("native", "F.linear", "packed", "fp32 blocks")}
        fastest = max((k for k in rates if rates[k]), key=lambda k: rates[k])
        cells = [f"{v:.1f}" if v else "-" for v in rates.values()] + [f"{ref:.1f}" if ref else "-"]
        cells += [f"{v / ref:.2f}" if v and ref else "-" for v in rates.values()] + [fastest]
        lines.append(f"| {r['dtype']} | {r['layer']} | {r['matrix']} [{r['O']}, {r['I']}] | {r['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----- end to end: generate -----------------------------------------------------------------------------
GEN_CONFIGS = {
    "qwen3_moe": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256),
    "mixtral": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=256),
}  # fmt: skip
GEN_IMPLS = ["eager", "grouped_mm", "batched_mm", "moekit", "moekit_packed"]


def time_generate(variants: dict[str, Callable[[], torch.nn.Module]], ids: torch.Tensor, new: int, rounds: int,
                  clock: Callable[[], float]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Greedy ``generate`` of ``new`` tokens after ``ids`` for each variant (``{name: prepare}``, ``prepare()``
    setting the model up and returning it), interleaved: one warm-up round (it also packs the weights for
    ``moekit_packed``), then ``rounds`` timed ones; the best time of each and its tokens."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    with torch.inference_mode():
        for rep in range(1 + rounds):
            for name, prepare in variants.items():
                model = prepare()
                t0 = clock()
                outputs[name] = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                if rep:
                    times[name].append(clock() - t0)
    return {name: min(ts) for name, ts in times.items()}, outputs


def experts_as(model: torch.nn.Module, impl: str) -> Callable[[], torch.nn.Module]:
    """A ``time_generate`` variant: ``model`` with its experts on ``impl``."""

    def prepare() -> torch.nn.Module:
        model.set_experts_implementation(impl)
        return model

    return prepare


def generate_speed(args) -> list[dict]:
    import transformers as tf

    import moekit.integrations.hf  # noqa: F401  (registers moekit, moekit_packed)

    prompt, new = (8, 8) if args.quick else (32, 64)
    clock = time.process_time if args.threads == 1 else time.perf_counter  # as the layer timings
    rows = []
    for family, kw in GEN_CONFIGS.items():
        cfg = (tf.Qwen3MoeConfig if family == "qwen3_moe" else tf.MixtralConfig)(**kw)
        if args.quick:
            cfg.num_hidden_layers = 2
        torch.manual_seed(0)
        model = (tf.Qwen3MoeForCausalLM if family == "qwen3_moe" else tf.MixtralForCausalLM)(cfg).eval()
        ids = torch.randint(3, kw["vocab_size"], (1, prompt))
        best, outputs = time_generate({impl: experts_as(model, impl) for impl in GEN_IMPLS}, ids, new, max(3, args.reps // 5), clock)
        for impl in GEN_IMPLS:
            rows.append({"model": family, "impl": impl, "new_tokens": new, "tokens_per_s": new / best[impl],
                         "same_tokens_as_eager": bool(torch.equal(outputs[impl], outputs["eager"]))})  # fmt: skip
            print(f"generate {family} {impl}: {new / best[impl]:.1f} tokens/s", file=sys.stderr)
        model.set_experts_implementation("eager")  # frees the packed copy
    return rows


# ----- report ---------------------------------------------------------------------------------------
def _pages(env: dict) -> str:
    """The run's page backing in words (``page_backing``; runs before it was recorded: unknown)."""
    pages = env.get("pages")
    if pages is None:
        return "page backing not recorded"
    asks = "torch's allocator asking for huge pages" if pages["THP_MEM_ALLOC_ENABLE"] == "1" else "torch's allocator not asking for huge pages"
    moved = ", the weights and the bounds' buffers moved onto huge pages (`to_huge_pages`)" if pages.get("to_huge_pages") else ""
    return f"transparent huge pages: {pages['transparent_hugepage']}, {asks}{moved}"


def _markdown(results: dict, args) -> str:
    env = results["environment"]
    lines = [f"Experts of one MoE layer, forward only (`torch.inference_mode`), CPU, {args.threads} thread(s); "
             f"best of the interleaved rounds (decode: {args.reps}, prefill: {max(4, args.reps // 2)} after 2 warm-up calls, "
             f"4096 tokens: 2), {results['clock']} time; "
             f"torch {env['torch']}, transformers {env['transformers']}; {_pages(env)}. Cells: time / bound "
             "(bound = max(bandwidth bound, dense-GEMM bound)); `moekit` is the default path, `packed` after "
             "`pack_for_inference`.", ""]  # fmt: skip
    heads = ["layer", "dtype", "T", "bound ms", "bound", "GB/s", "moekit", "packed", "hf eager", "hf grouped_mm",
             "hf batched_mm", "best hf / best moekit", "outputs agree"]  # fmt: skip
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in results["rows"]:
        cells = []
        for impl in IMPLS:
            v = r["impls"][impl]
            cells.append("skipped" if "skipped" in v else f"{v['x_bound']:.2f}")
        hf = [v["best_s"] for k, v in r["impls"].items() if k.startswith("hf_") and "best_s" in v]
        ours = min(r["impls"]["moekit"]["best_s"], r["impls"]["moekit_packed"]["best_s"])
        agree = all(v.get("matches_moekit", True) for v in r["impls"].values())
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['T']} | {r['bound_s'] * 1e3:.2f} | {r['bound_kind']} | "
                     f"{r['bandwidth_GBps']:.1f} | " + " | ".join(cells) + f" | {min(hf) / ours:.2f} | "
                     f"{'yes' if agree else 'NO'} |")  # fmt: skip
    lines += ["", _goals(results["rows"]), "", "**Summary grid (the README's table): best moekit path / best transformers "
              "implementation, each x bound**", "", readme_grid(results["rows"])]  # fmt: skip
    if results.get("generate"):
        lines += ["", "**End to end: greedy `generate`, tokens/s (tiny-config models, random weights)**", "",
                  "| model | " + " | ".join(GEN_IMPLS) + " |", "|---|" + "---|" * len(GEN_IMPLS)]  # fmt: skip
        by = {(r["model"], r["impl"]): r for r in results["generate"]}
        for family in GEN_CONFIGS:
            if (family, "eager") in by:
                cells = [f"{by[(family, i)]['tokens_per_s']:.1f}" + ("" if by[(family, i)]["same_tokens_as_eager"] else " (tokens differ)")
                         for i in GEN_IMPLS]  # fmt: skip
                lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def readme_grid(rows: list[dict]) -> str:
    """Rows layer x dtype, columns T: "best moekit path x bound / best transformers implementation x bound"."""
    tokens = sorted({r["T"] for r in rows})
    lines = ["| layer | dtype | " + " | ".join(f"T={t}" for t in tokens) + " |", "|---|---|" + "---|" * len(tokens)]
    keys = list(dict.fromkeys((r["layer"], r["dtype"]) for r in rows))
    by = {(r["layer"], r["dtype"], r["T"]): r for r in rows}
    for layer, dtype in keys:
        cells = []
        for t in tokens:
            r = by.get((layer, dtype, t))
            if r is None:
                cells.append("")
                continue
            ours = min(r["impls"]["moekit"]["x_bound"], r["impls"]["moekit_packed"]["x_bound"])
            hf = min(v["x_bound"] for k, v in r["impls"].items() if k.startswith("hf_") and "x_bound" in v)
            cells.append(f"{ours:.2f}x / {hf:.2f}x")
        lines.append(f"| {LAYER_NAMES.get(layer, layer)} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _goals(rows: list[dict]) -> str:
    parts = []
    for impl, label in (("moekit", "default"), ("moekit_packed", "packed")):
        decode = [r["impls"][impl]["x_bound"] for r in rows if r["T"] <= 16]
        prefill = [r["impls"][impl]["x_bound"] for r in rows if r["T"] > 16]
        if decode:
            parts.append(f"{label} decode: worst {max(decode):.2f}x, median {statistics.median(decode):.2f}x of the bound")
        if prefill:
            parts.append(f"{label} prefill: worst {max(prefill):.2f}x, median {statistics.median(prefill):.2f}x")
    behind = [f"{r['layer']} {r['dtype']} T={r['T']}" for r in rows
              if min(r["impls"]["moekit"]["best_s"], r["impls"]["moekit_packed"]["best_s"])
              > min(v["best_s"] for k, v in r["impls"].items() if k.startswith("hf_") and "best_s" in v)]  # fmt: skip
    parts.append("moekit behind the best transformers implementation at: " + (", ".join(behind) if behind else "none"))
    return "; ".join(parts) + "."


def assemble(args, out: Path, tag: str) -> None:
    """One result from the JSON of runs made in pieces (a shared machine: short runs, each with its load and
    page backing), in the order given: a row measured again in a later piece replaces the earlier one, and the
    environment is the last piece's."""
    import json

    from moekit.reporting import atomic_write_text, write_json

    parts = [json.loads(Path(p).read_text()) for p in args.assemble]
    rows: dict[tuple, dict] = {}  # a later piece's row replaces an earlier one of the same layer, dtype and T
    for p in parts:
        rows.update({(r["layer"], r["dtype"], r["T"]): r for r in p["rows"]})
    results = {**parts[-1], "rows": list(rows.values()), "shapes": {}, "pieces": []}
    for p in parts:
        results["shapes"].update(p["shapes"])
        results["pieces"].append({"command": p["environment"]["command"], "load_average": p.get("load_average"),
                                  "pages": p["environment"].get("pages")})  # fmt: skip
        if p.get("generate"):
            results["generate"] = p["generate"]
    write_json(out / f"{tag}.json", results)
    text = _markdown(results, args) + _profiles(results["rows"])
    if results["rows"]:
        text += "\n**Summary: moekit's best path and the best transformers implementation, x bound**\n\n"
        text += summary_table(results["rows"])
    atomic_write_text(out / f"{tag}.md", text)
    print(text)


def summary_table(rows: list[dict]) -> str:
    """The compact table for the README: best moekit path and best transformers implementation, x bound; and
    moekit against the no-overlap bound (bandwidth bound + dense-GEMM bound: the time if streaming the weights
    and computing never overlapped), which is where a prefill with a few rows per expert sits when both bounds
    are close: below 1 the kernel overlaps them, and max() is the unreachable ideal of perfect overlap; and
    moekit against the per-expert floor (the module docstring)."""
    lines = ["| layer | dtype | T | bound | moekit (best path) | best transformers impl. | transformers / moekit | "
             "moekit x GEMV-rate bound | moekit x no-overlap bound | moekit x per-expert floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ours = min(("moekit", "moekit_packed"), key=lambda k: r["impls"][k]["best_s"])
        hf = min((k for k, v in r["impls"].items() if k.startswith("hf_") and "best_s" in v), key=lambda k: r["impls"][k]["best_s"])
        floor = f"{r['impls'][ours]['best_s'] / r['floor_s']:.2f}" if "floor_s" in r else "n/a"  # runs before the floor
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['T']} | {r['bound_kind']} | {r['impls'][ours]['x_bound']:.2f}x "
                     f"({'packed' if ours == 'moekit_packed' else 'plain'}) | {r['impls'][hf]['x_bound']:.2f}x ({hf.removeprefix('hf_')}) | "
                     f"{r['impls'][hf]['best_s'] / r['impls'][ours]['best_s']:.2f} | "
                     f"{r['impls'][ours]['best_s'] / gemv_bound(r):.2f} | "
                     f"{r['impls'][ours]['best_s'] / (r['bw_bound_s'] + r['dense_bound_s']):.2f} | {floor} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def gemv_bound(row: dict) -> float:
    """The bound with the bandwidth one GEMV reaches (plain, packed or native, 256 MB matrix, same rounds) in place
    of the plain read's: what a matrix-vector kernel on one core can stream here, the decode limit."""
    gemv = min(v["best_s"] for k, v in row["bounds"].items() if k.startswith("bw_gemv"))
    return max(row["touched_bytes"] / (BW_BYTES / gemv), row["dense_bound_s"])


def _profiles(rows: list[dict]) -> str:
    """The profiles of the rows that miss their goal: top ops of moekit's call."""
    lines = []
    for r in rows:
        if "profile" not in r:
            continue
        ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["profile"]["top_ops"][:5])
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['T']} | {r['impls'][r['profile']['impl']]['x_bound']:.2f} | "
                     f"{r['bound_kind']} | {ops} |")  # fmt: skip
    if not lines:
        return ""
    head = ["", "**Where moekit misses the goal: top ops of one call (torch.profiler, self CPU time)**", "",
            "| layer | dtype | T | x bound | bound | ops (share of op time) |", "|---|---|---|---|---|---|"]  # fmt: skip
    return "\n".join(head + lines) + "\n"


def page_backing() -> dict[str, str | None]:
    """How this process's large tensors are backed, which moves every read rate: the kernel's transparent huge
    page mode (``always``, ``madvise``, ``never``; None off Linux) and ``THP_MEM_ALLOC_ENABLE`` (``1``: torch's
    allocator asks for huge pages, which ``madvise`` mode needs). On an AMD EPYC VM (Zen 4, ``madvise``),
    torch.sum over 256 MB read 17-22 GB/s on 4 KiB pages and 29-31 on huge pages, the native GEMV 23-26 and
    25-27 (``README``: Speed)."""
    from moekit.experts.huge_pages import thp_mode

    mode = thp_mode()
    return {"transparent_hugepage": mode, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def add_run_arguments(ap: argparse.ArgumentParser, *, reps: int, quick: str) -> None:
    """``--dtypes``, ``--reps``, ``--threads``, ``--quick`` and ``--out`` as the benchmarks beside this one take them
    (``quick``: what ``--quick`` runs); ``check_run_arguments`` validates them."""
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated subset of {list(DTYPES)} (default fp32,bf16)")
    ap.add_argument("--reps", type=int, default=reps, help=f"interleaved rounds (best kept; default {reps})")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--quick", action="store_true", help=f"{quick} (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))


def check_run_arguments(ap: argparse.ArgumentParser, args) -> list[str]:
    """The dtypes ``--dtypes`` names, after ``--reps`` and ``--threads`` are checked; a bad value ends the run
    naming it and what is allowed."""
    if args.reps < 1 or args.threads < 1:
        ap.error(f"--reps and --threads must be >= 1, got {args.reps}, {args.threads}")
    dtypes = args.dtypes.split(",")
    if bad := [d for d in dtypes if d not in DTYPES]:
        ap.error(f"--dtypes has unknown names {bad}; choose from {list(DTYPES)}")
    return dtypes


def chosen_shapes_and_dtypes(ap: argparse.ArgumentParser, args) -> tuple[dict[str, dict], list[str]]:
    """The layer shapes (``--shapes`` of ``SHAPES``, or ``QUICK`` with ``--quick``) and dtypes (``--dtypes``) the
    command line names; unknown names end the run with the choices."""
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        names = args.shapes.split(",")
        if unknown := [n for n in names if n not in shapes]:
            ap.error(f"--shapes has unknown names {unknown}; choose from {sorted(shapes)}")
        shapes = {n: shapes[n] for n in names}
    return shapes, check_run_arguments(ap, args)


def require_huge_pages(ap: argparse.ArgumentParser, what: str) -> None:
    """End the run, naming ``what`` asked for them, where ``moekit.experts.to_huge_pages`` cannot take effect."""
    from moekit.experts.huge_pages import thp_support

    try:
        thp_support()
    except RuntimeError as e:
        ap.error(f"{what}: {e}")


def save(out: Path, tag: str, results: dict, text: str) -> None:
    """``results`` as ``out/tag.json`` and ``text`` as ``out/tag.md`` (each written whole or not at all), and printed."""
    from moekit.reporting import atomic_write_text, write_json

    write_json(out / f"{tag}.json", results)
    atomic_write_text(out / f"{tag}.md", text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds at decode sizes (prefill: reps // 2, >= 4; 4096 tokens: 2)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated subset of {list(DTYPES)} (default fp32,bf16)")
    ap.add_argument("--tokens", default=None, help=f"comma-separated token counts (default {TOKENS})")
    ap.add_argument("--max-gather-gb", type=float, default=1.0, help="skip hf batched_mm above this weight copy (GB)")
    ap.add_argument("--no-generate", action="store_true", help="skip the end-to-end generate timing")
    ap.add_argument("--kernels", action="store_true", help="only measure the read rate of the GEMV kernels (native, F.linear, packed, torch.sum)")
    ap.add_argument("--profile", action="store_true", help="profile moekit's call where it misses its goal")
    ap.add_argument("--huge-pages", action="store_true", help="every contender's weights and the bounds' buffers on "
                    "transparent huge pages (moekit.experts.to_huge_pages)")
    ap.add_argument("--assemble", nargs="+", metavar="JSON", help="combine the JSON of separate runs (pieces) into one")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.reps < 1 or args.threads < 1:
        ap.error(f"--reps and --threads must be >= 1, got {args.reps}, {args.threads}")
    torch.set_num_threads(args.threads)
    from moekit.reporting import environment

    import transformers

    if args.huge_pages:
        require_huge_pages(ap, "--huge-pages")
    pages = {**page_backing(), "to_huge_pages": args.huge_pages}
    env = {**environment(), "transformers": transformers.__version__, "command": " ".join(sys.argv), "pages": pages}
    tag = "bench_infer" + ("_quick" if args.quick else "") + ("_kernels" if args.kernels else "")
    tag += f"_{args.threads}threads" if args.threads != 1 else ""
    tag += "_huge_pages" if args.huge_pages else ""
    out = Path(args.out)
    if args.assemble:
        assemble(args, out, tag)
        return
    if args.kernels:
        res = {"environment": env, "load_average": os.getloadavg(), **kernel_rates(args)}
        save(out, tag, res, kernels_markdown(res, args))
        return
    shapes, dtypes = chosen_shapes_and_dtypes(ap, args)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    rows, load_start = [], os.getloadavg()
    for name, shape in shapes.items():
        for dtype_name in dtypes:
            rows += run_layer(name, shape, dtype_name, tokens, args)
    results = {"environment": env, "clock": "process CPU" if args.threads == 1 else "wall", "shapes": shapes,
               "rows": rows, "goals": {"decode": DECODE_GOAL, "prefill": PREFILL_GOAL},
               "load_average": {"start": load_start, "end": os.getloadavg()}, "cpu_count": os.cpu_count()}  # fmt: skip
    if not args.no_generate:
        results["generate"] = generate_speed(args)
    save(out, tag, results, _markdown(results, args) + _profiles(rows))


if __name__ == "__main__":
    main()
