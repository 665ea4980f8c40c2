"""Training-step time (forward + backward) of an MoE layer with E=16, k=2 under the COMET and
DSelect-k gates: real conditional computation (``combine="sparse"``: only the experts with non-zero
gate weight run, through the grouped dispatch) against the same gate run densely over all experts
(``combine="dense"``, what the official implementations do). Goal: sparse >= 4x faster once the
gate is saturated (the FLOP ratio of the experts is E/k = 8).

Gates are measured saturated (split weights scaled up so every split is outside the smooth-step
band; the fraction of hard-routed tokens is reported) and, for honesty, at their soft
initialisation, where every expert has non-zero weight and sparse dispatch must run them all.

    python benchmarks/bench_comet.py            # writes benchmarks/results/bench_comet.{json,md}
    python benchmarks/bench_comet.py --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import moekit
from moekit.reporting import atomic_write_text, environment, markdown_table, write_json

SHAPE = dict(T=4096, D=256, F=1024, E=16, K=2)
QUICK = dict(T=128, D=32, F=64, E=16, K=2)
INPUT_SEED = 1  # the tokens; the gates and experts are seeded in build (0)


def build(gate: str, shape: dict, device: str, dtype: torch.dtype, saturated: bool) -> moekit.Router:
    torch.manual_seed(0)
    router = moekit.create_router(gate, dim=shape["D"], num_experts=shape["E"], k=shape["K"], gamma=1.0, device=device)
    if saturated:
        with torch.no_grad():
            splits = [router.split] if gate == "comet" else [router.z_proj]
            for layer in splits:
                layer.weight.mul_(1e4)
                layer.bias.mul_(1e4)
    return router


def time_step(layer: moekit.MoE, x: torch.Tensor, reps: int, device: str) -> float:
    """Median seconds of one forward + backward (after one warm-up step)."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).y.float().square().mean().backward()

    step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    shape = QUICK if args.quick else SHAPE
    dtype = getattr(torch, args.dtype)
    x = torch.randn(shape["T"], shape["D"], generator=torch.Generator().manual_seed(INPUT_SEED)).to(args.device, dtype)
    rows = []
    for gate in ("comet", "dselect"):
        for saturated in (True, False):
            router = build(gate, shape, args.device, dtype, saturated)
            experts = moekit.MLPExperts(shape["E"], shape["D"], shape["F"], device=args.device, dtype=dtype)
            with torch.no_grad():
                decision = router(x)
                hard = float(router.is_saturated(x).float().mean())
                run = float((decision.kept_mask() & (decision.weights_TK != 0)).sum(-1).float().mean())
            seconds = {
                c: time_step(moekit.MoE(router, experts, combine=c), x, args.reps, args.device)
                for c in ("sparse", "dense")
            }
            rows.append(
                {
                    "gate": gate,
                    "state": "saturated" if saturated else "soft (init)",
                    "hard_tokens": hard,
                    "experts_run_per_token": run,
                    "sparse_s": seconds["sparse"],
                    "dense_s": seconds["dense"],
                    "speedup": seconds["dense"] / seconds["sparse"],
                }
            )
            print(
                f"{gate:<8} {rows[-1]['state']:<12} hard {hard:5.1%}  experts/token {run:5.2f}"
                f"  sparse {seconds['sparse'] * 1e3:8.1f} ms  dense {seconds['dense'] * 1e3:8.1f} ms"
                f"  speedup {rows[-1]['speedup']:.2f}x",
                flush=True,
            )
    out = Path(args.out)
    tag = "bench_comet_quick" if args.quick else "bench_comet"
    write_json(
        out / f"{tag}.json",
        {
            "shape": shape,
            "dtype": args.dtype,
            "device": args.device,
            "reps": args.reps,
            "seeds": {"input": INPUT_SEED, "gates_and_experts": 0},
            "environment": environment(),
            "rows": rows,
        },
    )
    table = markdown_table(
        ["gate", "gate state", "hard-routed tokens", "experts run / token", "sparse ms", "dense ms", "dense / sparse"],
        [
            [
                r["gate"],
                r["state"],
                f"{r['hard_tokens']:.0%}",
                f"{r['experts_run_per_token']:.2f}",
                r["sparse_s"] * 1e3,
                r["dense_s"] * 1e3,
                f"{r['speedup']:.2f}x",
            ]
            for r in rows
        ],
        floatfmt=".1f",
    )
    s = shape
    head = (
        f"forward+backward of one MoE layer, T={s['T']}, D={s['D']}, F={s['F']}, E={s['E']}, k={s['K']}, "
        f"{args.dtype}, {args.device}, median of {args.reps} ({torch.get_num_threads()} threads)\n\n"
    )
    atomic_write_text(out / f"{tag}.md", head + table)
    print(head + table)


if __name__ == "__main__":
    main()
