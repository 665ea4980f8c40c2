"""MoE experts on a GPU: inference (forward only) and training (forward + backward) time of moekit vs
transformers' ``grouped_mm`` experts implementation, and ScatterMoE / MegaBlocks when importable.

Shapes: Qwen3-30B-A3B (D=2048, F=768, E=128, K=8), Mixtral-8x7B (D=4096, F=14336, E=8, K=2) and
OLMoE-1B-7B (D=2048, F=1024, E=64, K=8) SwiGLU experts in bf16; tokens T = 1, 16 (decode) and 1024, 4096
(prefill) for inference, T = 4096 for training. Every implementation runs the experts on identical
weights and routing (moekit's top-k router, run once per T); outputs are compared with moekit's. Timing:
CUDA events, median of ``--reps`` calls after warm-up.

    benchmarks/gpu.sh                                      # on a CUDA machine (this script and bench_moe.py)
    python benchmarks/bench_gpu.py --device cpu --quick     # the dry run: tiny shapes on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

SHAPES = {
    "qwen3_30b_a3b": dict(D=2048, F=768, E=128, K=8),
    "mixtral_8x7b": dict(D=4096, F=14336, E=8, K=2),
    "olmoe_1b_7b": dict(D=2048, F=1024, E=64, K=8),
}
QUICK = {"tiny": dict(D=64, F=128, E=8, K=2)}
INFER_TOKENS, TRAIN_TOKENS = [1, 16, 1024, 4096], [4096]
QUICK_TOKENS = [1, 16]
TOL = 3e-2  # bf16


def _clock(device: str) -> Callable[[Callable], float]:
    """Seconds of one call: CUDA events on a GPU, wall time on CPU (the dry run)."""

    def run(fn: Callable) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def contenders(shape: dict, device: str, dtype: torch.dtype, training: bool) -> tuple[dict, Callable]:
    """``{name: fn(x, ids, weights) -> y}`` on one shared set of weights, and the router."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    import moekit
    from moekit.experts import dispatch
    from moekit.types import RoutingDecision

    D, Fh, E, K = shape["D"], shape["F"], shape["E"], shape["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    bank = moekit.GLUExperts(E, D, Fh, device="meta", dtype=dtype)
    gate_up = torch.nn.Parameter((torch.randn(E, 2 * Fh, D, generator=g) / D**0.5).to(device, dtype), requires_grad=training)
    down = torch.nn.Parameter((torch.randn(E, D, Fh, generator=g) / Fh**0.5).to(device, dtype), requires_grad=training)
    bank.gate_up_proj, bank.down_proj = gate_up, down
    router = moekit.TopKRouter(D, E, K, noisy=False, device=device)
    fns: dict[str, Callable] = {"moekit": lambda x, ids, w: dispatch(bank, x, RoutingDecision(ids, w, E))}
    cfg = MixtralConfig(hidden_size=D, intermediate_size=Fh, num_local_experts=E, num_experts_per_tok=K,
                        experts_implementation="grouped_mm")  # fmt: skip
    with torch.device("meta"):
        hf = MixtralExperts(cfg)
    hf.gate_up_proj, hf.down_proj = gate_up, down
    fns["hf_grouped_mm"] = lambda x, ids, w: hf(x, ids, w)
    if device == "cuda" and importlib.util.find_spec("scattermoe") is not None:
        fns["scattermoe"] = _scattermoe(gate_up, down, E, K)
    if device == "cuda" and importlib.util.find_spec("megablocks") is not None:
        fns["megablocks_available"] = None  # its layers own their weights and router: noted, not timed
    return {k: v for k, v in fns.items() if v is not None}, router


def _scattermoe(gate_up: torch.Tensor, down: torch.Tensor, E: int, K: int) -> Callable:
    """ScatterMoE's parallel linear on the same weights (its kernels take ``[E, in, out]``)."""
    from scattermoe import kernels
    from scattermoe.parallel_experts import parallel_linear

    w1, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)

    def run(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            sorted_expert_idxs, sorted_scattered_idxs = kernels.ops.flatten_and_sort(ids)
            offsets = kernels.ops.padded_block_indices(sorted_expert_idxs, E)
        h = parallel_linear(x, w1, K, sorted_expert_idxs, sorted_scattered_idxs, offsets, grouped_out=True)
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        return parallel_linear(h, w2, 1, sorted_expert_idxs, sorted_scattered_idxs, offsets, grouped_in=True,
                               gates=w).view(x.shape[0], -1)  # fmt: skip

    return run


def run_case(name: str, shape: dict, T: int, device: str, dtype: torch.dtype, training: bool, reps: int) -> dict:
    fns, router = contenders(shape, device, dtype, training)
    g = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, shape["D"], generator=g).to(device, dtype)
    with torch.no_grad():
        d = router(x.float())
    ids, w = d.ids_TK, d.weights_TK.to(dtype)
    clock = _clock(device)
    row: dict = {"layer": name, "T": T, "mode": "train" if training else "inference", "impls": {}}
    outs = {}
    for impl, fn in fns.items():
        def call(fn=fn):
            if training:
                xi = x.detach().requires_grad_(True)
                y = fn(xi, ids, w)
                y.float().square().mean().backward()
                return y.detach()
            with torch.inference_mode():
                return fn(x, ids, w)

        try:
            outs[impl] = call()  # warm-up (and the output compared)
            times = [clock(call) for _ in range(reps)]
        except Exception as err:  # noqa: BLE001 -- an implementation that cannot run this case is reported
            row["impls"][impl] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            continue
        row["impls"][impl] = {"median_s": statistics.median(times), "best_s": min(times)}
    ref = outs.get("moekit")
    for impl, y in outs.items():
        if ref is not None:
            diff = float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
            row["impls"][impl].update(max_rel_diff=diff, matches_moekit=diff <= TOL)
    print(_line(row), file=sys.stderr, flush=True)
    return row


def _line(row: dict) -> str:
    cells = " ".join(f"{k}={v['median_s'] * 1e3:.3f}ms" if "median_s" in v else f"{k}=error" for k, v in row["impls"].items())
    return f"{row['layer']} {row['mode']} T={row['T']}: {cells}"


def markdown(results: dict) -> str:
    impls = sorted({k for r in results["rows"] for k in r["impls"]}, key=lambda k: (k != "moekit", k))
    lines = [f"MoE experts, bf16, {results['device']} ({results['environment'].get('cuda') or 'CPU dry run'}); "
             "median ms (x moekit)", "", "| layer | mode | T | " + " | ".join(impls) + " | outputs agree |",
             "|---|---|---|" + "---|" * (len(impls) + 1)]  # fmt: skip
    for r in results["rows"]:
        base = r["impls"].get("moekit", {}).get("median_s")
        cells = []
        for k in impls:
            v = r["impls"].get(k)
            if v is None or "error" in v:
                cells.append("-" if v is None else "error")
            else:
                cells.append(f"{v['median_s'] * 1e3:.3f}" + (f" ({v['median_s'] / base:.2f}x)" if base and k != "moekit" else ""))
        agree = all(v.get("matches_moekit", True) for v in r["impls"].values())
        lines.append(f"| {r['layer']} | {r['mode']} | {r['T']} | " + " | ".join(cells) + f" | {'yes' if agree else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU dry run)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --quick for the dry run)")
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    from moekit.reporting import atomic_write_text, environment, write_json

    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        if unknown := [n for n in args.shapes.split(",") if n not in shapes]:
            ap.error(f"--shapes has unknown names {unknown}; choose from {sorted(shapes)}")
        shapes = {n: shapes[n] for n in args.shapes.split(",")}
    rows = []
    for name, shape in shapes.items():
        for training, tokens in ((False, QUICK_TOKENS if args.quick else INFER_TOKENS),
                                 (True, QUICK_TOKENS[-1:] if args.quick else TRAIN_TOKENS)):  # fmt: skip
            for T in tokens:
                rows.append(run_case(name, shape, T, args.device, torch.bfloat16, training, args.reps))
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    results = {"environment": {**environment(), "command": " ".join(sys.argv)}, "device": args.device, "rows": rows}
    tag = "bench_gpu" + ("_quick" if args.quick else "") + ("" if args.device == "cuda" else "_cpu")
    out = Path(args.out)
    write_json(out / f"{tag}.json", results)
    text = markdown(results)
    atomic_write_text(out / f"{tag}.md", text)
    print(text)


if __name__ == "__main__":
    main()
