"""Decode on transparent huge pages: one MoE layer's experts as allocated (4 KiB pages where THP is in ``madvise``
mode and ``THP_MEM_ALLOC_ENABLE`` is unset) against the same weights after ``moekit.experts.to_huge_pages``,
interleaved in one process.

Both banks hold identical weights and get identical tokens and routing (``bench_infer.Layer``'s router); every
call runs after 64 MB of other reads (``bench_infer.flush_caches``), and the best of ``--reps`` rounds is kept.
The read rate of ``torch.sum`` over a 256 MB buffer on each kind of page, timed in the same rounds, is what the
bandwidth bound of ``bench_infer.py`` would become. Columns: touched experts' bytes / time, huge / 4 KiB (> 1:
huge pages faster), the bytes the kernel backs with huge pages (``huge_page_bytes``), outputs compared.

    python benchmarks/bench_pages.py                          # -> results/bench_pages.{json,md}
    python benchmarks/bench_pages.py --shapes qwen3_30b_a3b --dtypes bf16 --tokens 1 --reps 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import (BW_BYTES, DTYPES, SHAPES, Layer, add_run_arguments, chosen_shapes_and_dtypes,  # noqa: E402
                         page_backing, require_huge_pages, save, time_interleaved)

from moekit.experts import dispatch, huge_pages  # noqa: E402
from moekit.types import RoutingDecision  # noqa: E402

KINDS = ("4k", "huge")


def _huge_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on huge pages (through ``to_huge_pages`` on a holder module)."""
    holder = torch.nn.Module()
    holder.register_buffer("t", t.clone())
    huge_pages.to_huge_pages(holder, min_bytes=1)
    return holder.t


def run_layer(name: str, shape: dict, dtype_name: str, tokens: list[int], reps: int, threads: int) -> list[dict]:
    """Rows of one layer in one dtype: per T, the read rate of each bank and of ``torch.sum`` on each page kind."""
    layer = Layer(shape, DTYPES[dtype_name])
    plain = layer.banks["moekit"]
    huge = type(plain)(shape["E"], shape["D"], shape["F"], device="meta", dtype=plain.gate_up_proj.dtype)
    huge.gate_up_proj = torch.nn.Parameter(plain.gate_up_proj.detach().clone(), requires_grad=False)
    huge.down_proj = torch.nn.Parameter(plain.down_proj.detach().clone(), requires_grad=False)
    report = huge_pages.to_huge_pages(huge, min_bytes=1)  # every tensor, the quick shapes' small ones too
    banks = {"4k": plain, "huge": huge}
    sums = {"4k": torch.randn(BW_BYTES // 4)}
    sums["huge"] = _huge_copy(sums["4k"])
    backing = {kind: huge_pages.huge_page_bytes(*bank.parameters()) for kind, bank in banks.items()}
    sum_backing = {kind: huge_pages.huge_page_bytes(t) for kind, t in sums.items()}
    rows = []
    with torch.inference_mode():
        for T in tokens:
            g = torch.Generator().manual_seed(1 + T)
            x = torch.randn(T, shape["D"], generator=g).to(plain.gate_up_proj.dtype)
            decision = layer.router(x.float())
            run = RoutingDecision(decision.ids_TK, decision.weights_TK.to(x.dtype), shape["E"])
            touched = int((torch.bincount(decision.ids_TK.flatten(), minlength=shape["E"]) > 0).sum())
            fns = {kind: (lambda b=bank: dispatch(b, x, run)) for kind, bank in banks.items()}
            fns |= {f"sum_{kind}": (lambda t=t: t.sum()) for kind, t in sums.items()}
            stats, outputs = time_interleaved(fns, reps, time.process_time if threads == 1 else time.perf_counter)
            nbytes = touched * layer.expert_bytes
            rate = {k: (nbytes if k in KINDS else BW_BYTES) / stats[k]["best_s"] / 1e9 for k in fns}
            row = {"layer": name, "dtype": dtype_name, "T": T, "touched_experts": touched, "touched_bytes": nbytes,
                   "GBps": rate, "huge_over_4k": rate["huge"] / rate["4k"],
                   "sum_huge_over_4k": rate["sum_huge"] / rate["sum_4k"], "times": stats,
                   "max_abs_diff": float((outputs["huge"].float() - outputs["4k"].float()).abs().max()),
                   "huge_page_bytes": {"weights": backing, "sum": sum_backing}, "moved": report.__dict__,
                   "load_average": os.getloadavg()}  # fmt: skip
            rows.append(row)
            print(f"{name} {dtype_name} T={T}: 4k {rate['4k']:.1f} GB/s, huge {rate['huge']:.1f} GB/s "
                  f"({row['huge_over_4k']:.2f}x); torch.sum {rate['sum_4k']:.1f} / {rate['sum_huge']:.1f} GB/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f}"


def markdown(res: dict) -> str:
    env = res["environment"]
    rows = res["rows"]
    lines = [f"Experts of one MoE layer at decode (`torch.inference_mode`), CPU, {res['threads']} thread(s), weights as "
             f"allocated (`4k`) and after `moekit.experts.to_huge_pages` (`huge`), interleaved, caches flushed before "
             f"every call, best of {res['reps']} rounds, {'process CPU' if res['threads'] == 1 else 'wall'} time; torch {env['torch']}; transparent huge "
             f"pages: {env['pages']['transparent_hugepage']}, THP_MEM_ALLOC_ENABLE={env['pages']['THP_MEM_ALLOC_ENABLE']}.",
             "", "| layer | dtype | T | 4k GB/s | huge GB/s | huge / 4k | torch.sum 4k / huge GB/s | huge-page MiB (4k, huge) | "
             "outputs equal |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        b = r["huge_page_bytes"]["weights"]
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['T']} | {r['GBps']['4k']:.1f} | {r['GBps']['huge']:.1f} | "
                     f"{r['huge_over_4k']:.2f}x | {r['GBps']['sum_4k']:.1f} / {r['GBps']['sum_huge']:.1f} | "
                     f"{_mib(b['4k'])}, {_mib(b['huge'])} | {'yes' if r['max_abs_diff'] == 0 else r['max_abs_diff']} |")  # fmt: skip
    ratios = [r["huge_over_4k"] for r in rows]
    sums = [r["sum_huge_over_4k"] for r in rows]
    lines += ["", f"huge / 4k: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x; "
              f"torch.sum huge / 4k: median {statistics.median(sums):.2f}x."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {sorted(SHAPES)}")
    ap.add_argument("--tokens", default="1,4,16", help="comma-separated token counts (default 1,4,16)")
    add_run_arguments(ap, reps=9, quick="tiny shapes")
    args = ap.parse_args()
    shapes, dtypes = chosen_shapes_and_dtypes(ap, args)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    require_huge_pages(ap, "bench_pages.py compares against huge pages")
    torch.set_num_threads(args.threads)
    from moekit.reporting import environment

    env = {**environment(), "command": " ".join(sys.argv), "pages": page_backing()}
    rows = [row for name, shape in shapes.items() for d in dtypes for row in run_layer(name, shape, d, tokens, args.reps, args.threads)]
    res = {"environment": env, "threads": args.threads, "reps": args.reps, "shapes": shapes, "rows": rows}
    tag = "bench_pages" + ("_quick" if args.quick else "") + (f"_{args.threads}threads" if args.threads != 1 else "")
    out = Path(args.out)
    save(out, tag, res, markdown(res))


if __name__ == "__main__":
    main()
