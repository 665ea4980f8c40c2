"""Forward+backward time and peak memory of a top-k SwiGLU MoE layer: moekit vs Hugging Face
transformers' Mixtral sparse block (``MixtralSparseMoeBlock``: router + ``MixtralExperts``) with each
experts implementation it offers on this device, vs the dense bound.

The dense bound is the same active FLOPs as one dense SwiGLU GEMM chain over T*K tokens (one
expert's weights, the T*K rows already materialised). All implementations get identical weights,
inputs and router weights, so they route identically; the script checks that their outputs agree.
Parameter gradients are reset (``grad = None``) before every step, as in a training loop.

Timing runs all implementations in one process, interleaved (one step of each per round), so that
load from other processes hits them alike. Peak memory is read separately, one fresh subprocess per
implementation: on CPU the resident-set high-water mark (``VmHWM``, reset after the imports) minus
the resident set after the imports (weights, inputs, activations and gradients); on CUDA
``max_memory_allocated``. Hugging Face's
``batched_mm`` implementation gathers a copy of both expert weight matrices per routed token; it is
skipped (and says so) when that copy alone would exceed ``--max-gather-gb``.

Timing: ``--threads`` intra-op threads (default 1 on CPU: on a shared machine, multi-threaded
timings of many mid-sized GEMMs mostly measure the other processes), the best of ``--reps`` rounds
after one warm-up step (medians are kept in the JSON too). Ratios use ``--clock``: ``cpu`` (process
CPU time, the default on CPU with one thread -- it leaves out the time spent waiting for a core that
another process holds) or ``wall`` (the default otherwise, and always on CUDA).

    python benchmarks/bench_moe.py            # both issue shapes, writes benchmarks/results/bench_moe.{json,md}
    python benchmarks/bench_moe.py --threads 2  # ... bench_moe_2threads.{json,md}
    python benchmarks/bench_moe.py --quick    # tiny shapes, no memory column (smoke test): bench_moe_quick.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"E8": dict(T=4096, D=512, F=1024, E=8, K=2), "E64": dict(T=4096, D=512, F=512, E=64, K=4)}
QUICK = {"tiny": dict(T=256, D=64, F=128, E=8, K=2)}
IMPLS = ["dense_bound", "moekit", "moekit_no_split", "hf_eager", "hf_grouped_mm", "hf_batched_mm"]
GOAL = 1.2  # moekit within this factor of the dense bound


def _setup(shape: dict, device: str):
    torch.manual_seed(0)
    T, D, Fh, E = shape["T"], shape["D"], shape["F"], shape["E"]
    x = torch.randn(T, D, device=device)
    gate_up = torch.randn(E, 2 * Fh, D, device=device) / D**0.5
    down = torch.randn(E, D, Fh, device=device) / Fh**0.5
    router = torch.randn(E, D, device=device) / D**0.5
    return x, gate_up, down, router


def _gather_gb(shape: dict) -> float:
    """Size of the per-token weight copies ``batched_mm`` makes: T*K x (gate_up + down)."""
    return shape["T"] * shape["K"] * 3 * shape["F"] * shape["D"] * 4 / 2**30


def _build(impl: str, shape: dict, device: str):
    """Return ``(step, params)``: ``step()`` runs one forward+backward and returns the output."""
    x, gate_up, down, router_w = _setup(shape, device)
    T, D, Fh, E, K = shape["T"], shape["D"], shape["F"], shape["E"], shape["K"]
    x.requires_grad_(True)
    if impl == "dense_bound":
        w1 = gate_up[0].clone().requires_grad_()
        w2 = down[0].clone().requires_grad_()
        xk = x.detach().repeat(K, 1).requires_grad_()

        def dense_step():
            g, u = F.linear(xk, w1).chunk(2, -1)
            y = F.linear(F.silu(g) * u, w2)
            y.sum().backward()
            return None

        return dense_step, [xk, w1, w2]
    if impl == "moekit_no_split":
        # moekit with the CPU split of the groups over threads switched off (F.grouped_mm alone),
        # to show what the split changes in the same run; identical to moekit at one thread.
        from moekit.experts import cpu_grouped

        step, params = _build("moekit", shape, device)

        def no_split_step():
            saved, cpu_grouped.MIN_SPLIT_MACS = cpu_grouped.MIN_SPLIT_MACS, float("inf")
            try:
                return step()
            finally:
                cpu_grouped.MIN_SPLIT_MACS = saved

        return no_split_step, params
    if impl == "moekit":
        import moekit

        router = moekit.TopKRouter(D, E, K, noisy=False, device=device)
        experts = moekit.GLUExperts(E, D, Fh, device=device)
        with torch.no_grad():
            router.gate.weight.copy_(router_w)
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
        layer = moekit.MoE(router, experts)

        def moekit_step():
            y = layer(x).y
            y.sum().backward()
            return y

        return moekit_step, [x, *layer.parameters()]
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=Fh, num_local_experts=E, num_experts_per_tok=K,
                        experts_implementation=impl.removeprefix("hf_"))
    block = MixtralSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        block.gate.weight.copy_(router_w)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(down)

    def hf_step():
        y = block(x.unsqueeze(0))
        y = y[0] if isinstance(y, tuple) else y
        y.sum().backward()
        return y.reshape(T, D)

    return hf_step, [x, *block.parameters()]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fresh(step, params):
    """A step that first resets the parameter gradients (as ``zero_grad(set_to_none=True)`` does)."""

    def run():
        for p in params:
            p.grad = None
        return step()

    return run


def time_all(impls: list[str], shape: dict, device: str, reps: int) -> dict[str, dict]:
    """Build every implementation in this process and time them *interleaved* (one step of each per
    round), so that a change in machine load affects all of them alike. Returns per-impl timings."""
    steps = {impl: _fresh(*_build(impl, shape, device)) for impl in impls}
    rows = {}
    for impl, step in steps.items():  # warm-up, and the output for the agreement check
        y = step()
        rows[impl] = {"impl": impl, "wall": [], "cpu": []}
        if y is not None:
            y64 = y.detach().double()
            rows[impl]["checksum"] = [float(y64.sum()), float(y64.norm())]
    _sync(device)
    for _ in range(reps):
        for impl, step in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            rows[impl]["wall"].append(time.perf_counter() - w0)
            rows[impl]["cpu"].append(time.process_time() - c0)
    for row in rows.values():
        wall, cpu = sorted(row.pop("wall")), sorted(row.pop("cpu"))
        row.update(wall_seconds=wall[0], wall_median_seconds=wall[len(wall) // 2],
                   cpu_seconds=cpu[0], cpu_median_seconds=cpu[len(cpu) // 2])
    return rows


def _proc_status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MB from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_worker(impl: str, shape: dict, device: str) -> float:
    """Peak memory (MB) of two forward+backward steps in a fresh process: CUDA ``max_memory_allocated``,
    or the resident-set high-water mark minus the resident set after the imports (weights, inputs,
    activations, gradients). ``ru_maxrss`` is not used: a child inherits its parent's high-water mark."""
    import moekit  # noqa: F401  (imported before the baseline)
    import transformers  # noqa: F401

    base = _proc_status_mb("VmRSS")
    if base is None or not _reset_peak_rss():
        raise OSError("peak memory on CPU needs Linux /proc/self/status and /proc/self/clear_refs")
    step = _fresh(*_build(impl, shape, device))
    step()
    step()  # the second step runs with the allocator warm, as in training
    _sync(device)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status_mb("VmHWM") - base


def _peak_memory(impl: str, shape: dict, args: argparse.Namespace) -> float | str:
    cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
           "--memory-worker", impl, json.dumps(shape)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return lines[-1][:200]
    return float(done.stdout.strip().splitlines()[-1])


def _agreement(rows: list[dict]) -> None:
    """Mark each row whose output matches moekit's (relative difference of sum and norm)."""
    ref = next((r["checksum"] for r in rows if r["impl"] == "moekit" and "checksum" in r), None)
    for r in rows:
        if ref is not None and "checksum" in r and r["impl"] != "moekit":
            scale = max(abs(ref[1]), 1e-12)
            r["matches_moekit"] = all(abs(a - b) <= 1e-4 * scale for a, b in zip(r["checksum"], ref))


def run_shape(name: str, shape: dict, args: argparse.Namespace) -> list[dict]:
    """Time every implementation that fits, measure its memory unless ``--quick``, compute ratios."""
    skipped = {}
    if _gather_gb(shape) > args.max_gather_gb:
        skipped["hf_batched_mm"] = f"skipped: would gather {_gather_gb(shape):.0f} GB of per-token weight copies"
    if args.threads == 1:
        skipped["moekit_no_split"] = "same code path as moekit at one thread"
    impls = [i for i in IMPLS if i not in skipped]
    timed = time_all(impls, shape, args.device, args.reps)
    rows = []
    for impl in IMPLS:
        if impl in skipped:
            rows.append({"impl": impl, "error": skipped[impl]})
            continue
        row = timed[impl]
        peak = float("nan") if args.quick else _peak_memory(impl, shape, args)
        row["peak_mem_mb"] = peak if isinstance(peak, float) else float("nan")
        if isinstance(peak, str):
            row["memory_error"] = peak
        rows.append(row)
        print(f"{name} {impl:>14}: wall {row['wall_seconds'] * 1e3:8.1f} ms  cpu {row['cpu_seconds'] * 1e3:8.1f} ms"
              f"  peak {row['peak_mem_mb']:7.1f} MB", file=sys.stderr, flush=True)
    key = f"{args.clock}_seconds"
    bound = timed["dense_bound"][key]
    for r in rows:
        if "error" not in r:
            r["ratio_to_dense_bound"] = r[key] / bound
    _agreement(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and no memory column, for smoke tests")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (one step of each implementation per round)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: 1 on CPU)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="time the ratios use (default: cpu on CPU with one thread, else wall)")
    ap.add_argument("--max-gather-gb", type=float, default=2.0, help="skip batched_mm above this copy size")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)} (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "SHAPE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.memory_worker:
        print(peak_memory_worker(args.memory_worker[0], json.loads(args.memory_worker[1]), args.device))
        return
    shapes = QUICK if args.quick else SHAPES
    if args.shapes and not args.quick:
        names = args.shapes.split(",")
        if unknown := [n for n in names if n not in SHAPES]:
            ap.error(f"--shapes has unknown names {unknown}; choose from {sorted(SHAPES)}")
        shapes = {n: SHAPES[n] for n in names}
    results = {name: {"shape": shape, "rows": run_shape(name, shape, args)} for name, shape in shapes.items()}
    _write(Path(args.out), results, args)


def _write(out: Path, results: dict, args: argparse.Namespace) -> None:
    from moekit.reporting import atomic_write_text, environment, write_json

    env = {**environment(), "device": args.device, "threads": args.threads, "reps": args.reps, "clock": args.clock}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    tag = "bench_moe_quick" if args.quick else "bench_moe"
    if args.device == "cpu" and args.threads != 1:
        tag += f"_{args.threads}threads"
    write_json(out / f"{tag}.json", {"environment": env, "goal_ratio": GOAL, "results": results})
    lines = [f"forward+backward, fp32, {args.device}, {args.threads} thread(s), best of {args.reps} interleaved rounds, "
             f"ratios on {args.clock} time; torch {torch.__version__}, transformers {env['transformers']}\n"]
    for name, res in results.items():
        s = res["shape"]
        lines.append(f"\n**T={s['T']}, D={s['D']}, F={s['F']}, E={s['E']}, K={s['K']}**\n")
        lines.append("| implementation | wall ms | CPU ms | x dense bound | peak MB | output = moekit |\n"
                     "|---|---|---|---|---|---|")
        lines += [_row(r) for r in res["rows"]]
        moe = next(r for r in res["rows"] if r["impl"] == "moekit")
        verdict = "meets" if moe["ratio_to_dense_bound"] <= GOAL else "misses"
        lines.append(f"\nmoekit {moe['ratio_to_dense_bound']:.2f}x the dense bound: {verdict} the {GOAL}x goal.")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / f"{tag}.md", text)
    print(text)


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['impl']} | {r['error'][:100]} | | | | |"
    same = {True: "yes", False: "NO"}.get(r.get("matches_moekit"), "")
    peak = "n/a" if r["peak_mem_mb"] != r["peak_mem_mb"] else f"{r['peak_mem_mb']:.0f}"
    return (f"| {r['impl']} | {r['wall_seconds'] * 1e3:.1f} | {r['cpu_seconds'] * 1e3:.1f} | "
            f"{r['ratio_to_dense_bound']:.2f} | {peak} | {same} |")


if __name__ == "__main__":
    main()
