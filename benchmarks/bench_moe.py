"""Forward+backward time and peak memory of a top-k SwiGLU MoE layer: moekit vs Hugging Face
transformers' Mixtral experts (each experts implementation) vs the dense bound.

The dense bound is the same active FLOPs as one dense SwiGLU GEMM chain over T*K tokens. All
implementations get identical weights, inputs and routing (the same router logits). Each
implementation runs in its own subprocess so that its peak resident memory can be read
(``ru_maxrss`` at the end minus after the imports: weights, inputs, activations and gradients);
on CUDA, ``max_memory_allocated`` is used. Hugging Face's ``batched_mm`` implementation gathers a
copy of the expert weights per token, which is what this memory column is there to catch.

    python benchmarks/bench_moe.py            # both issue shapes, writes benchmarks/results/
    python benchmarks/bench_moe.py --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"E8": dict(T=4096, D=512, F=1024, E=8, K=2), "E64": dict(T=4096, D=512, F=512, E=64, K=4)}
QUICK = {"tiny": dict(T=256, D=64, F=128, E=8, K=2)}
IMPLS = ["dense_bound", "moekit", "hf_eager", "hf_grouped_mm", "hf_batched_mm"]


def _setup(shape: dict, device: str):
    torch.manual_seed(0)
    T, D, Fh, E = shape["T"], shape["D"], shape["F"], shape["E"]
    x = torch.randn(T, D, device=device)
    gate_up = torch.randn(E, 2 * Fh, D, device=device) / D**0.5
    down = torch.randn(E, D, Fh, device=device) / Fh**0.5
    router = torch.randn(E, D, device=device) / D**0.5
    return x, gate_up, down, router


def _build(impl: str, shape: dict, device: str):
    """Return a closure running one forward+backward, with its parameters."""
    x, gate_up, down, router_w = _setup(shape, device)
    T, D, Fh, E, K = shape["T"], shape["D"], shape["F"], shape["E"], shape["K"]
    x.requires_grad_(True)
    if impl == "dense_bound":
        w1 = gate_up[0].clone().requires_grad_()
        w2 = down[0].clone().requires_grad_()
        xk = x.detach().repeat(K, 1).requires_grad_()

        def step():
            g, u = F.linear(xk, w1).chunk(2, -1)
            F.linear(F.silu(g) * u, w2).sum().backward()

        return step
    if impl == "moekit":
        import moekit

        router = moekit.TopKRouter(D, E, K, noisy=False).to(device)
        experts = moekit.GLUExperts(E, D, Fh, device=device)
        with torch.no_grad():
            router.gate.weight.copy_(router_w)
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
        layer = moekit.MoE(router, experts)
        return lambda: layer(x).y.sum().backward()
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=Fh, num_local_experts=E, num_experts_per_tok=K,
                        experts_implementation=impl.removeprefix("hf_"))
    block = MixtralSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        block.gate.weight.copy_(router_w)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(down)

    def step():
        out = block(x.unsqueeze(0))
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(impl: str, shape: dict, device: str, reps: int) -> dict:
    import moekit  # noqa: F401  (imports before the memory baseline)
    import transformers  # noqa: F401

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = _build(impl, shape, device)
    step()  # warm-up
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024)
    return {"impl": impl, "seconds": sorted(times)[len(times) // 2], "peak_mem_mb": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]), args.device, args.reps)))
        return
    shapes = QUICK if args.quick else SHAPES
    results = {}
    for name, shape in shapes.items():
        rows = []
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--device", args.device, "--reps", str(args.reps),
                   "--worker", impl, json.dumps(shape)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                error = done.stderr.strip().splitlines()[-1]
                print(f"{name} {impl}: failed: {error[:200]}", file=sys.stderr)
                rows.append({"impl": impl, "seconds": float("nan"), "peak_mem_mb": float("nan"), "error": error[:200]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name} {impl:>14}: {rows[-1]['seconds'] * 1e3:8.1f} ms  peak {rows[-1]['peak_mem_mb']:7.1f} MB", flush=True)
        bound = next(r["seconds"] for r in rows if r["impl"] == "dense_bound")
        for r in rows:
            r["ratio_to_dense_bound"] = r["seconds"] / bound
        results[name] = {"shape": shape, "rows": rows}
    _write(Path(args.out), results, args)


def _write(out: Path, results: dict, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(), "reps": args.reps}
    tag = "bench_moe_quick" if args.quick else "bench_moe"
    (out / f"{tag}.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    lines = [f"forward+backward, fp32, {args.device}, median of {args.reps} ({torch.get_num_threads()} threads)\n"]
    for name, res in results.items():
        s = res["shape"]
        lines.append(f"\n**T={s['T']}, D={s['D']}, F={s['F']}, E={s['E']}, K={s['K']}**\n")
        lines.append("| implementation | ms | x dense bound | peak MB |\n|---|---|---|---|")
        lines += [_row(r) for r in res["rows"]]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['impl']} | failed: {r['error'][:90]} | | |"
    return f"| {r['impl']} | {r['seconds'] * 1e3:.1f} | {r['ratio_to_dense_bound']:.2f} | {r['peak_mem_mb']:.0f} |"


if __name__ == "__main__":
    main()
