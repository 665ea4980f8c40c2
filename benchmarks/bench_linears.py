"""Dense products at decode and prefill sizes: ``nn.Linear`` after ``moekit.experts.linears_for_inference`` against
torch's ``F.linear`` on the same weights, on the attention and output-layer shapes of Qwen3-30B-A3B and Mixtral-8x7B.

Both modules share one weight; every call runs after 64 MB of other reads (``bench_infer.flush_caches``),
interleaved, best of ``--reps`` rounds, process CPU time at 1 thread (wall time with more). Cells: torch's time /
moekit's (> 1: moekit faster).

    python benchmarks/bench_linears.py                   # -> results/bench_linears.{json,md}, fp32 and bf16, 1 thread
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import DTYPES, add_run_arguments, check_run_arguments, flush_caches, page_backing, save  # noqa: E402

#: [out, in] of each model's attention projections and of a 32k-vocabulary output layer (as bench_generate)
SHAPES = {
    "qwen3 q_proj": (4096, 2048), "qwen3 k/v_proj": (512, 2048), "qwen3 o_proj": (2048, 4096),
    "mixtral q/o_proj": (4096, 4096), "mixtral k/v_proj": (1024, 4096), "lm_head 32k x 2048": (32000, 2048),
}  # fmt: skip
ROWS = (1, 4, 16, 64, 256)
QUICK = {"tiny": (64, 96)}


def measure(O: int, I: int, dtype: torch.dtype, rows: tuple[int, ...], reps: int, clock) -> dict[int, dict]:
    """Per row count: the best time of ``F.linear`` and of the switched module, and their largest difference."""
    from moekit.experts import linears_for_inference

    torch.manual_seed(0)
    plain = nn.Linear(I, O, bias=False).to(dtype)
    fast = linears_for_inference(nn.Linear(I, O, bias=False, device="meta"))
    fast.weight = plain.weight
    out = {}
    with torch.inference_mode():
        for M in rows:
            x = torch.randn(M, I).to(dtype)
            best = {"torch": float("inf"), "moekit": float("inf")}
            for _ in range(reps):
                for name, module in (("torch", plain), ("moekit", fast)):
                    flush_caches()
                    t0 = clock()
                    module(x)
                    best[name] = min(best[name], clock() - t0)
            diff = float((fast(x).float() - plain(x).float()).abs().max())
            out[M] = {"torch_s": best["torch"], "moekit_s": best["moekit"], "speedup": best["torch"] / best["moekit"],
                      "max_abs_diff": diff}  # fmt: skip
    return out


def markdown(res: dict) -> str:
    a, env = res["args"], res["environment"]
    rows = res["rows_measured"]
    lines = [f"Dense products, `linears_for_inference` against `F.linear` (time ratio, > 1: moekit faster), {a['threads']} "
             f"thread(s), best of {a['reps']} interleaved rounds, caches flushed before every call; torch {env['torch']}.",
             "", "| matrix [out, in] | dtype | " + " | ".join(f"{m} rows" for m in rows) + " |",
             "|---|---|" + "---|" * len(rows)]  # fmt: skip
    for r in res["results"]:
        cells = " | ".join(f"{r['rows'][str(m)]['speedup']:.2f}x" for m in rows)
        lines.append(f"| {r['name']} {r['shape']} | {r['dtype']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap, reps=9, quick="one tiny matrix")
    args = ap.parse_args()
    dtypes = check_run_arguments(ap, args)
    torch.set_num_threads(args.threads)
    from moekit.reporting import environment

    clock = time.process_time if args.threads == 1 else time.perf_counter
    rows = (1, 4) if args.quick else ROWS
    results = []
    for name, (O, I) in (QUICK if args.quick else SHAPES).items():
        for d in dtypes:
            measured = measure(O, I, DTYPES[d], rows, args.reps, clock)
            results.append({"name": name, "shape": [O, I], "dtype": d, "rows": {str(m): v for m, v in measured.items()}})
            print(f"{name} [{O}, {I}] {d}: " + "  ".join(f"{m} rows {v['speedup']:.2f}x" for m, v in measured.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
    env = {**environment(), "command": " ".join(sys.argv), "pages": page_backing()}
    res = {"environment": env, "args": vars(args), "rows_measured": list(rows), "results": results}
    tag = "bench_linears" + ("_quick" if args.quick else "") + (f"_{args.threads}threads" if args.threads != 1 else "")
    save(Path(args.out), tag, res, markdown(res))


if __name__ == "__main__":
    main()
