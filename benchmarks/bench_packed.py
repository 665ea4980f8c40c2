"""Packed vs dense-masked low-rank + sparse experts (MC-SMoE compression): time of one MoE layer.

The same pruned bank (rank-r factors, a random ``keep`` fraction of residual rows per matrix) as
``LowRankSparseExperts`` (dense ``S [E, O, I]`` times a row mask) and as
``PackedLowRankSparseExperts`` (only the kept rows), plus the uncompressed ``GLUExperts`` it came
from, in ``MoE(TopKRouter(noisy=False), bank)``: forward + backward, fp32, one intra-op thread,
implementations timed interleaved (one step each per round, best of ``--reps`` rounds, CPU time).
The script checks that packed and masked outputs agree.

Inference (forward only, ``torch.inference_mode``): the same three banks on a larger layer (``INFER``) at
decode and prefill sizes; the compressed banks run their ``expert_inference`` (factors and kept rows read
once), the dense bank its own inference path; time relative to the dense bank, outputs compared with it
(``keep = 100%``: the compressed banks compute the dense function up to rounding).

    python benchmarks/bench_packed.py           # writes benchmarks/results/bench_packed.{json,md}
    python benchmarks/bench_packed.py --quick   # tiny shapes (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import moekit
from moekit.merging import LowRankSparseExperts, PackedLowRankSparseExperts

SHAPES = {"full": dict(T=2048, D=128, F=256, E=4, K=2, rank=16), "quick": dict(T=128, D=32, F=64, E=4, K=2, rank=4)}
INFER = {"full": dict(D=1024, F=2048, E=8, K=2, rank=64, tokens=[1, 16, 256]),
         "quick": dict(D=64, F=128, E=4, K=2, rank=8, tokens=[1, 16])}  # fmt: skip


def banks(s: dict, keep: float) -> dict[str, moekit.ExpertBank]:
    torch.manual_seed(0)
    dense = moekit.GLUExperts(s["E"], s["D"], s["F"])
    masked = LowRankSparseExperts.from_bank(dense, s["rank"])
    with torch.no_grad():
        for m in masked.matrices:
            mask = getattr(masked, f"{m}_mask")
            mask.copy_((torch.rand_like(mask) < keep).to(mask))
    return {"dense GLU": dense, "masked": masked, "packed": PackedLowRankSparseExperts.from_masked(masked)}


def step(layer: moekit.MoE, x: torch.Tensor) -> float:
    for p in layer.parameters():
        p.grad = None
    t = time.process_time()
    layer(x).y.sum().backward()
    return time.process_time() - t


def run(s: dict, keeps: list[float], reps: int) -> list[dict]:
    rows = []
    x = torch.randn(s["T"], s["D"])
    for keep in keeps:
        torch.manual_seed(1)
        router = moekit.TopKRouter(s["D"], s["E"], s["K"], noisy=False)
        layers = {name: moekit.MoE(router, bank) for name, bank in banks(s, keep).items()}
        with torch.no_grad():
            torch.testing.assert_close(layers["packed"](x).y, layers["masked"](x).y, rtol=1e-4, atol=1e-5)
        best = {name: float("inf") for name in layers}
        for _ in range(reps):
            for name, layer in layers.items():
                best[name] = min(best[name], step(layer, x))
        for name, layer in layers.items():
            stored = sum(p.numel() for p in layer.experts.parameters())
            rows.append({"keep": keep, "bank": name, "ms": 1e3 * best[name], "x masked": best[name] / best["masked"],
                         "stored params": stored})  # fmt: skip
    return rows


def run_inference(s: dict, keeps: list[float], reps: int) -> list[dict]:
    """Forward-only time of each bank (best of ``reps`` interleaved rounds, CPU time) per kept fraction and T."""
    rows = []
    for keep in keeps:
        torch.manual_seed(1)
        router = moekit.TopKRouter(s["D"], s["E"], s["K"], noisy=False)
        layers = {name: moekit.MoE(router, bank).eval() for name, bank in banks(s, keep).items()}
        for T in s["tokens"]:
            x = torch.randn(T, s["D"])
            with torch.inference_mode():
                outs = {name: layer(x).y for name, layer in layers.items()}
                best = {name: float("inf") for name in layers}
                for _ in range(reps):
                    for name, layer in layers.items():
                        t = time.process_time()
                        layer(x)
                        best[name] = min(best[name], time.process_time() - t)
            torch.testing.assert_close(outs["packed"], outs["masked"], rtol=1e-4, atol=1e-4)
            for name in layers:
                diff = float((outs[name] - outs["dense GLU"]).abs().max() / outs["dense GLU"].abs().max())
                rows.append({"keep": keep, "T": T, "bank": name, "ms": 1e3 * best[name],
                             "x dense": best[name] / best["dense GLU"], "max rel diff vs dense": diff})  # fmt: skip
    return rows


def markdown_inference(rows: list[dict], s: dict, reps: int) -> str:
    head = (f"Inference (forward only): D={s['D']}, F={s['F']}, E={s['E']}, K={s['K']}, rank={s['rank']}; "
            f"best of {reps}, CPU time, 1 thread\n\n")  # fmt: skip
    lines = ["| kept rows | T | bank | CPU ms | x dense |", "|---|---|---|---|---|"]
    lines += [f"| {r['keep']:.0%} | {r['T']} | {r['bank']} | {r['ms']:.3f} | {r['x dense']:.2f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def markdown(rows: list[dict], s: dict, reps: int) -> str:
    head = f"T={s['T']}, D={s['D']}, F={s['F']}, E={s['E']}, K={s['K']}, rank={s['rank']}; forward + backward, best of {reps}\n\n"
    lines = ["| kept rows | bank | CPU ms | x masked | stored expert params |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['keep']:.0%} | {r['bank']} | {r['ms']:.2f} | {r['x masked']:.2f} | {r['stored params']:,} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = "quick" if args.quick else "full"
    s, keeps = SHAPES[name], [1.0, 0.5, 0.1]
    rows = run(s, keeps, args.reps)
    infer_rows = run_inference(INFER[name], keeps, args.reps)
    text = markdown(rows, s, args.reps) + "\n" + markdown_inference(infer_rows, INFER[name], args.reps)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_packed" + ("_quick" if args.quick else "")
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(), "threads": 1,
           "load_average": os.getloadavg(), "command": " ".join(sys.argv)}
    (out / f"{stem}.json").write_text(
        json.dumps({"shapes": s, "reps": args.reps, "environment": env, "rows": rows,
                    "inference": {"shapes": INFER[name], "rows": infer_rows}}, indent=2) + "\n"
    )
    (out / f"{stem}.md").write_text(f"# Packed vs masked low-rank + sparse experts\n\n{text}")


if __name__ == "__main__":
    main()
