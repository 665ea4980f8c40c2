"""Forward+backward time and memory of a SMEAR layer against one expert of the same size and the
output ensemble (every expert run, outputs mixed), as the SMEAR issue asks:

* adapters: D=768, bottleneck 24, E=8;  FFN experts: D=512, F=1024, E=8;  16 examples x 128 positions.
* goal: SMEAR within 1.3x of one expert, and at least 4x faster than the ensemble.

Times are measured in one process with the implementations interleaved rep by rep (the machine's
load changes hit all of them alike); memory is measured in a fresh subprocess per (case,
implementation) so its peak resident memory can be read (``ru_maxrss`` at the end minus after setup;
on CUDA ``max_memory_allocated``). Peak is above the memory after setup (inputs and parameters):
activations, merged parameters, gradients and temporaries of one forward+backward. "saved MB" is the size
of the tensors autograd keeps for backward beyond the layer's own parameters (unique storages, via
``saved_tensors_hooks``): a deterministic memory measure that allocator noise does not blur. ``smear`` is
the layer as shipped (fused merge-and-matmul, ``moekit.experts.merged_linear``); ``smear_reference`` is
the plain path it replaced (``merged_forward``: all merged copies built at once and kept for backward);
``smear_chunked`` is SMEAR with a merge budget of a quarter of the batch's merged parameters
(``merge_chunk_bytes``); ``smear_torch`` is the layer as shipped with the native merged products switched off
(``MOEKIT_NATIVE_GEMV=0``: torch's chunked loop, the path of CUDA and bf16), next to ``smear``, which takes them
on a fp32 CPU whose kernel has AVX-512. A sweep over positions per example (FFN case) locates the two
crossovers: where SMEAR's merge overhead (about E/S of one expert) falls under 1.3x, and where the
merged parameters per example (P values) stop exceeding the activations saved for backward.

    python benchmarks/bench_smear.py            # the issue's shapes, writes benchmarks/results/bench_smear.{json,md}
    python benchmarks/bench_smear.py --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

import moekit
from moekit.layers.smear import PlainMergeDispatch
from moekit.reporting import atomic_write_text, write_json

CASES = {
    "adapter": dict(bank="adapter", D=768, W=24, E=8, B=16, S=128),
    "ffn": dict(bank="mlp", D=512, W=1024, E=8, B=16, S=128),
    "ffn_short": dict(bank="mlp", D=512, W=1024, E=8, B=64, S=16),  # many short examples: merged copies dominate
}
QUICK = {"adapter": dict(bank="adapter", D=64, W=8, E=8, B=4, S=16), "ffn": dict(bank="mlp", D=32, W=64, E=8, B=4, S=16),
         "ffn_short": dict(bank="mlp", D=32, W=64, E=8, B=16, S=2)}


IMPLS = ["one_expert", "smear", "smear_torch", "smear_reference", "smear_chunked", "ensemble"]
SWEEP_S = [1, 4, 16, 32, 64, 128, 512]
SWEEP_CHUNK_BYTES = [64 * 2**20, 32 * 2**20, 4 * 2**20, 2**20]


def _build(impl: str, case: dict, device: str):
    from moekit.layers.smear import merged_bytes_per_group

    width = {"adapter": "bottleneck", "mlp": "hidden"}[case["bank"]]
    E = 1 if impl == "one_expert" else case["E"]
    bank = moekit.create_experts(case["bank"], num_experts=E, dim=case["D"], **{width: case["W"]}, device=device)
    if impl == "one_expert":
        return moekit.SingleExpert(bank)
    if impl == "ensemble":
        return moekit.OutputEnsemble(bank, expert_dropout=0.0, device=device)
    if impl == "smear_reference":
        layer = moekit.SMEAR(bank, expert_dropout=0.0, merge_chunk_bytes=2**40, device=device)
        layer.dispatcher = PlainMergeDispatch()
        return layer
    budget = 2**40 if impl in ("smear", "smear_torch") else max(1, case["B"] * merged_bytes_per_group(bank) // 4)
    layer = moekit.SMEAR(bank, expert_dropout=0.0, merge_chunk_bytes=budget, device=device)
    layer.native_off = impl == "smear_torch"
    return layer


def _native_off(off: bool) -> contextlib.AbstractContextManager:
    """``MOEKIT_NATIVE_GEMV=0`` while the block runs (``off``): the torch path of ``merged_linear``."""
    return mock.patch.dict(os.environ, {"MOEKIT_NATIVE_GEMV": "0"}) if off else contextlib.nullcontext()


def _saved_bytes(layer, x) -> int:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _native_off(getattr(layer, "native_off", False)):
        y = layer(x).y
        y.square().mean().backward()
    return sum(seen.values())


def _step(layer, x) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with _native_off(getattr(layer, "native_off", False)):
        layer(x).y.square().mean().backward()


def memory(case: dict, impl: str, device: str) -> dict:
    """Saved-for-backward MB and peak memory MB of one forward+backward (run in a fresh process)."""
    torch.manual_seed(0)
    layer = _build(impl, case, device)
    x = torch.randn(case["B"], case["S"], case["D"], device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    _step(layer, x)
    saved = _saved_bytes(layer, x)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _peak_rss() - base
    return {"impl": impl, "saved_mb": saved / 2**20, "peak_mb": peak / 2**20}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the resident-set high-water mark (Linux ``clear_refs``) and return the current RSS in bytes;
    where that is unavailable, the process's peak so far (``ru_maxrss``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return 1024 * _status_kb("VmRSS")
    except OSError:
        return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss() -> int:
    try:
        return 1024 * _status_kb("VmHWM")
    except OSError:
        return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def timings(case: dict, impls: list[str], device: str, reps: int) -> dict[str, dict]:
    """Forward+backward ms per implementation, measured interleaved (every rep runs each implementation
    once, so load changes on a shared machine hit all alike); ``x_one`` is the median per-rep ratio to
    ``one_expert``."""
    torch.manual_seed(0)
    layers = {impl: _build(impl, case, device) for impl in impls}
    x = torch.randn(case["B"], case["S"], case["D"], device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for rep in range(reps + 1):
        for impl, layer in layers.items():
            sync()
            t0 = time.perf_counter()
            _step(layer, x)
            sync()
            if rep:  # rep 0 is warm-up
                times[impl].append(1000 * (time.perf_counter() - t0))
    out = {}
    for impl, ts in times.items():
        ratios = [t / o for t, o in zip(ts, times["one_expert"])]
        out[impl] = {"ms": statistics.median(ts), "x_one": statistics.median(ratios)}
    return out


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(memory(json.loads(args.child), args.impl, args.device)))


def _run_child(case: dict, impl: str, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case), "--impl", impl, "--device", device, "--threads", str(threads)]
    # a fixed mmap threshold makes glibc return large freed blocks at once, so the RSS high-water mark
    # follows the live tensors instead of the allocator's cached heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"impl": impl, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _analytic(case: dict) -> dict:
    """Parameters per expert P, merged MB per example, activations saved per position, crossovers."""
    D, W, E = case["D"], case["W"], case["E"]
    P = 2 * D * W + W + D
    act_per_pos = D + 2 * W  # input, hidden before and after the activation (fp32 values saved for backward)
    return {"params_per_expert": P, "merged_mb_per_example": 4 * P / 2**20, "saved_values_per_position": act_per_pos,
            "memory_crossover_S": P / act_per_pos, "compute_crossover_S_1.3x": E / 0.3}  # fmt: skip


def _best_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best-of-``reps`` CPU milliseconds of each function, the functions interleaved rep by rep."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            if rep:  # rep 0 is warm-up
                times[k].append(1e3 * (time.process_time() - t))
    return {k: min(v) for k, v in times.items()}


def _linear_products(G: int, S: int, O: int, I: int, E: int, chunk_bytes: int) -> dict[str, Callable[[], object]]:
    """Each product ``merged_linear`` runs for one ``[E, O, I]`` layer with bias -- the native merged products
    where they run (``runs_native``), else torch's chunked loop (same calls, shapes and buffers as the
    kernel) -- and the products one expert runs for the same layer."""
    import torch.nn.functional as F

    from moekit.experts import native_gemv
    from moekit.experts.merged_linear import _rows_per_chunk, long_dots, runs_native

    g = torch.Generator().manual_seed(0)
    p, w, b = torch.rand(G, E, generator=g), torch.randn(E, O * I, generator=g), torch.randn(E, O, generator=g)
    x, grad_y = torch.randn(G, S, I, generator=g), torch.randn(G, S, O, generator=g)
    one_w, one_b, x2, gy2 = w[:, : O * I].reshape(E, O, I)[0], b[0], x.reshape(G * S, I), grad_y.reshape(G * S, O)
    one = {
        "one expert: forward": lambda: F.linear(x2, one_w, one_b),
        "one expert: grad_x": lambda: torch.mm(gy2, one_w),
        "one expert: grad W": lambda: torch.mm(gy2.t(), x2),
    }
    w_EOI = w.view(E, O, I)
    if runs_native(x, p, w):
        return {
            "smear: forward, merged per 64 columns (native)": lambda: native_gemv.merged_forward(x, p, w_EOI, b),
            "smear: grad_x, merged again (native)": lambda: native_gemv.merged_grad_input(grad_y, p, w_EOI),
            "smear: grad W_g -> grad probs, grad w (native)": lambda: native_gemv.merged_grad_weights(x, grad_y, p, w_EOI),
            **one,
        }
    n = _rows_per_chunk(G, O, I, 4, chunk_bytes)
    merged, grad_m = torch.empty(G * n * I), torch.empty(G * n * I)
    y, grad_x, grad_pT, grad_w = torch.empty(G, S, O), torch.empty(G, S, I), torch.zeros(E, G), torch.empty(E, O * I)
    b_GO = p @ b
    chunks = [(o0, min(n, O - o0)) for o0 in range(0, O, n)]

    def merge() -> None:
        for o0, k in chunks:
            torch.mm(p, w[:, o0 * I : (o0 + k) * I], out=merged[: G * k * I].view(G, k * I))

    def each_chunk(op: Callable[[int, int, Tensor, Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for o0, k in chunks:
                op(o0, k, merged[: G * k * I].view(G, k, I), grad_m[: G * k * I].view(G, k, I))
        return run

    def forward(o0: int, k: int, m: Tensor, _: Tensor) -> None:
        torch.baddbmm(b_GO[:, o0 : o0 + k].unsqueeze(1), x, m.transpose(1, 2), out=y[:, :, o0 : o0 + k])

    def input_grad(o0: int, k: int, m: Tensor, _: Tensor) -> None:
        if o0 == 0:
            torch.bmm(grad_y[:, :, :k], m, out=grad_x)
        else:
            grad_x.baddbmm_(grad_y[:, :, o0 : o0 + k], m)

    return {
        "smear: forward x_g @ W_g^T (per example)": each_chunk(forward),
        "smear: grad_x (per example)": each_chunk(input_grad),
        "smear: grad W_g = grad_y_g^T x_g (per example)": each_chunk(lambda o0, k, _, gm: torch.bmm(
            grad_y[:, :, o0 : o0 + k].transpose(1, 2), x, out=gm)),
        "smear: merge W_g = sum_e p_ge w_e (forward)": merge,
        "smear: merge again (backward)": merge,
        "smear: grad probs <grad W_g, w_e>": each_chunk(lambda o0, k, _, gm: grad_pT.add_(
            long_dots(w[:, o0 * I : (o0 + k) * I], gm.view(G, k * I)))),
        "smear: grad w = probs^T grad W": each_chunk(lambda o0, k, _, gm: torch.mm(
            p.t(), gm.view(G, k * I), out=grad_w[:, o0 * I : (o0 + k) * I])),
        **one,
    }


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _fault_us(mb: int = 16) -> float:
    """Microseconds per first-touch page fault: writing a fresh anonymous ``mmap`` of ``mb`` MB (every page
    faults once) against rewriting it, per fault counted. (Fresh tensors cannot measure it: the allocator
    may hand back pages it already holds.)"""
    region = mmap.mmap(-1, mb << 20)
    values = torch.frombuffer(region, dtype=torch.uint8)
    f0, t = _minor_faults(), time.perf_counter()
    values.fill_(1)
    fresh_ms, faults = 1e3 * (time.perf_counter() - t), _minor_faults() - f0
    t = time.perf_counter()
    values.fill_(2)
    rewrite_ms = 1e3 * (time.perf_counter() - t)
    del values
    region.close()
    return 1e3 * max(0.0, fresh_ms - rewrite_ms) / max(1, faults)


def breakdown_ffn(case: dict, reps: int) -> dict:
    """Where SMEAR's FFN step goes against one expert's: every product ``merged_linear`` runs in one
    forward+backward (both layers, all chunks at the default chunk size), each timed alone (best of
    ``reps``, interleaved), next to one expert's products; the first-touch page faults of each step
    (counted in the bench's own interleaved loop, priced per fault); and the whole steps. "rest" is the
    step minus the parts: activation, router, loss, bias sums, and the products' slowdown when they share
    the cache with each other instead of running alone."""
    from moekit.experts.merged_linear import DEFAULT_CHUNK_BYTES

    G, S, D, W, E = case["B"], case["S"], case["D"], case["W"], case["E"]
    parts: dict[str, float] = {}
    for O, I in ((W, D), (D, W)):
        for k, v in _best_ms(_linear_products(G, S, O, I, E, DEFAULT_CHUNK_BYTES), reps).items():
            parts[k] = parts.get(k, 0.0) + v
    steps, faults = _steps_and_faults(case, reps)
    fault_us = _fault_us()
    out: dict = {"step_ms": steps, "faults_per_step": faults, "us_per_fault": fault_us}
    fault_ms = {k: v * fault_us / 1e3 for k, v in out["faults_per_step"].items()}
    one = out["step_ms"]["one_expert"]
    rows: dict[str, float] = {}
    for impl, who in (("one_expert", "one expert"), ("smear", "smear")):
        rows.update({k: v for k, v in parts.items() if k.startswith(who + ":")})
        rows[f"{who}: first-touch page faults"] = fault_ms[impl]
        rows[f"{who}: rest"] = out["step_ms"][impl] - sum(v for k, v in rows.items() if k.startswith(who + ":"))
    out["rows"] = [{"part": k, "ms": v, "x_one": v / one} for k, v in rows.items()]
    out["smear_x_one"] = out["step_ms"]["smear"] / one
    by_chunk, _ = _steps_and_faults(case, reps, chunks=[DEFAULT_CHUNK_BYTES, *SWEEP_CHUNK_BYTES])
    out["x_one_by_chunk_bytes"] = {c: by_chunk[f"smear_{c}"] / by_chunk["one_expert"] for c in [DEFAULT_CHUNK_BYTES, *SWEEP_CHUNK_BYTES]}
    return out


def _steps_and_faults(case: dict, reps: int, chunks: list[int] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median step ms and minor page faults per step of one expert and SMEAR (with each merge chunk size
    of ``chunks``: ``smear_<bytes>``), interleaved rep by rep in one process as ``timings`` runs them."""
    torch.manual_seed(0)
    layers = {"one_expert": _build("one_expert", case, "cpu")}
    for c in chunks or [None]:
        layer = _build("smear", case, "cpu")
        if c is not None:
            layer.merge_chunk_bytes = c
        layers["smear" if c is None else f"smear_{c}"] = layer
    x = torch.randn(case["B"], case["S"], case["D"], requires_grad=True)
    steps: dict[str, list[float]] = {impl: [] for impl in layers}
    faults: dict[str, list[int]] = {impl: [] for impl in layers}
    for rep in range(reps + 1):
        for impl, layer in layers.items():
            f0, t = _minor_faults(), time.perf_counter()
            _step(layer, x)
            if rep:  # rep 0 is warm-up
                steps[impl].append(1e3 * (time.perf_counter() - t))
                faults[impl].append(_minor_faults() - f0)
    return {k: statistics.median(v) for k, v in steps.items()}, {k: statistics.median(v) for k, v in faults.items()}


def _environment() -> dict:
    """What a rerun needs to match: the command, versions, the CPU and the native kernel's build, the seed."""
    from moekit.experts import native_gemv

    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__, "moekit": moekit.__version__,
            "python": platform.python_version(), "cpu": native_gemv._cpuinfo("model name") or platform.processor(),
            "native_kernel": native_gemv.build_info().get("isa"),
            "native_merged_products": native_gemv.merged_available(), "seed": 0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="only the FFN case's time split -> bench_smear_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)
    cases = QUICK if args.quick else CASES
    if args.profile:
        prof = {"case": cases["ffn"], "threads": args.threads, **_environment(), "load_average": os.getloadavg(),
                **breakdown_ffn(cases["ffn"], args.reps)}  # fmt: skip
        write_json(Path(args.out) / ("bench_smear_profile_quick.json" if args.quick else "bench_smear_profile.json"), prof)
        print("\n".join(_breakdown_markdown(prof)))
        return
    results: dict = {"device": args.device, "threads": args.threads, "reps": args.reps, **_environment(),
                     "load_average_start": os.getloadavg(), "cases": {}}  # fmt: skip
    for name, case in cases.items():
        speed = timings(case, IMPLS, args.device, args.reps)
        rows = [{**_run_child(case, impl, args.device, args.threads), **speed[impl]} for impl in IMPLS]
        results["cases"][name] = {"shape": case, "rows": rows, "analytic": _analytic(case)}
        print(name, json.dumps(rows))
    ffn = cases["ffn"]
    sweep = []
    for S in SWEEP_S if not args.quick else [1, 16]:
        shape = {**ffn, "S": S}
        speed = timings(shape, ["one_expert", "smear"], args.device, args.reps)
        one, smear = (memory(shape, impl, args.device) for impl in ("one_expert", "smear"))
        sweep.append({"S": S, "one_ms": speed["one_expert"]["ms"], "smear_ms": speed["smear"]["ms"], "ratio": speed["smear"]["x_one"],
                      "one_saved_mb": one["saved_mb"], "smear_saved_mb": smear["saved_mb"]})  # fmt: skip
        print("sweep", json.dumps(sweep[-1]))
    results["sweep_ffn"] = sweep
    if args.device == "cpu":  # CPU time and page faults: a CPU split
        results["breakdown_ffn"] = breakdown_ffn(ffn, args.reps)
    results["load_average_end"] = os.getloadavg()
    stem = "bench_smear_quick" if args.quick else "bench_smear"
    out = Path(args.out)
    write_json(out / f"{stem}.json", results)
    atomic_write_text(out / f"{stem}.md", _markdown(results))
    print((out / f"{stem}.md").read_text())


def _markdown(results: dict) -> str:
    lines = [f"forward+backward, fp32, {results['device']}, {results['threads']} thread(s); ms = median of {results['reps']} "
             "interleaved reps; x one expert = median of the per-rep ratios", ""]
    for name, case in results["cases"].items():
        s = case["shape"]
        rows = {r["impl"]: r for r in case["rows"] if "error" not in r}
        smear, ens = (rows.get(k, {}).get("x_one") for k in ("smear", "ensemble"))
        lines += [f"**{name}: D={s['D']}, width={s['W']}, E={s['E']}, {s['B']} examples x {s['S']} positions**", "",
                  "| implementation | ms | x one expert | saved for backward MB | peak MB |", "|---|---|---|---|---|"]  # fmt: skip
        for r in case["rows"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | error: {r['error']} | | | |")
                continue
            lines.append(f"| {r['impl']} | {r['ms']:.1f} | {r['x_one']:.2f} | {r['saved_mb']:.1f} | {r['peak_mb']:.0f} |")
        if smear and ens:
            lines += ["", f"SMEAR / one expert = {smear:.2f} (goal <= 1.3: {'met' if smear <= 1.3 else 'not met'}); "
                      f"ensemble / SMEAR = {ens / smear:.2f} (goal >= 4: {'met' if ens / smear >= 4 else 'not met'})."]  # fmt: skip
        a = case["analytic"]
        lines += [f"Analytic: P = {a['params_per_expert']:,} parameters per expert, {a['merged_mb_per_example']:.2f} MB merged "
                  f"per example; merged parameters exceed the activations saved for backward below S ~ {a['memory_crossover_S']:.0f} "
                  f"positions; the merge overhead E/S falls under 0.3 above S ~ {a['compute_crossover_S_1.3x']:.0f}.", ""]  # fmt: skip
    lines += ["**FFN sweep over positions per example (same B, D, F, E)**", "",
              "| S | one expert ms | SMEAR ms | SMEAR / one | one saved MB | SMEAR saved MB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["sweep_ffn"]:
        lines.append(f"| {r['S']} | {r['one_ms']:.1f} | {r['smear_ms']:.1f} | {r['ratio']:.2f} | {r['one_saved_mb']:.1f} | {r['smear_saved_mb']:.1f} |")
    if "breakdown_ffn" in results:
        lines += ["", *_breakdown_markdown(results["breakdown_ffn"])]
    if "load_average_start" in results:
        lines += ["", f"Load average (1, 5, 15 min) at start {_load(results['load_average_start'])}, "
                  f"at end {_load(results['load_average_end'])}."]  # fmt: skip
    if "command" in results:
        lines += ["", f"`{results['command']}` on {results['cpu']} (native kernel: {results['native_kernel']}, merged products "
                  f"{'on' if results['native_merged_products'] else 'off'}), torch {results['torch']}, moekit {results['moekit']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _load(avg: list[float]) -> str:
    return ", ".join(f"{a:.2f}" for a in avg)


def _breakdown_markdown(b: dict) -> list[str]:
    """The FFN step split (``breakdown_ffn``) as a table."""
    lines = ["**Where the FFN step goes** (`breakdown_ffn`: each product of one step timed alone, best of the reps; "
             f"page faults counted per step at {b['us_per_fault']:.2f} us each; x one expert = ms / one expert's step)", "",
             "| part | ms | x one expert |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['part']} | {r['ms']:.1f} | {r['x_one']:.3f} |" for r in b["rows"]]
    steps, faults = b["step_ms"], b["faults_per_step"]
    lines += ["", f"Steps (median): one expert {steps['one_expert']:.1f} ms, SMEAR {steps['smear']:.1f} ms = "
              f"{b['smear_x_one']:.2f}x; minor page faults per step: one expert {faults['one_expert']:.0f}, "
              f"SMEAR {faults['smear']:.0f}. SMEAR / one expert by merge chunk size: "
              + ", ".join(f"{int(c) / 2**20:g} MiB {r:.2f}x" for c, r in b["x_one_by_chunk_bytes"].items()) + "."]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
