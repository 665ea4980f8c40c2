"""Expert-parallel MoE layer under torchrun: tokens/s, all-to-all vs compute time, bytes exchanged.

Weak scaling: every rank routes the same number of tokens per step; the layer's E experts are
sharded over the world (ep = world). For each world size (1 and 2 processes on CPU with gloo, one
thread per process; GPUs with NCCL when present) a torchrun job times forward+backward steps (the
median over steps of the slowest rank), then a few more steps with every ``all_to_all_single`` of the
layer (count exchange, tokens, results; forward and backward) timed: first a barrier on the same
group (the wait for the slower rank: load imbalance), then the exchange itself; the rest of the
step is compute. Bytes are counted from the routing: rows that leave their rank, times the row size,
for the dispatch and the return trip, forward and backward. The plain single-process ``moekit.MoE``
on the same tokens, timed in alternation, is the baseline of the 1-process row.

    python benchmarks/bench_expert_parallel.py            # writes benchmarks/results/bench_expert_parallel.{json,md}
    python benchmarks/bench_expert_parallel.py --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(T=4096, D=256, F=512, E=8, K=2)  # T tokens per rank
QUICK = dict(T=256, D=32, F=64, E=4, K=2)


def _build(shape: dict, device: torch.device):
    import moekit

    torch.manual_seed(0)
    router = moekit.TopKRouter(shape["D"], shape["E"], k=shape["K"], noisy=False, device=device)
    experts = moekit.GLUExperts(shape["E"], shape["D"], shape["F"], device=device)
    return moekit.MoE(router, experts)


def _steps(layer, x: torch.Tensor, n: int, sync) -> float:
    start = time.perf_counter()
    for _ in range(n):
        layer(x).y.square().mean().backward()
    sync()
    return time.perf_counter() - start


class _CollectiveTimer:
    """Wraps ``torch.distributed.all_to_all_single`` (looked up at call time by moekit.distributed.comm)
    to add the time spent waiting at a barrier and in the exchange itself."""

    def __init__(self, sync) -> None:
        import torch.distributed as dist

        self.dist, self.sync, self.original = dist, sync, dist.all_to_all_single
        self.wait_s = self.transfer_s = 0.0

    def __call__(self, *args, **kwargs):
        group = kwargs.get("group")
        self.sync()
        t0 = time.perf_counter()
        self.dist.barrier(group=group)
        t1 = time.perf_counter()
        result = self.original(*args, **kwargs)
        self.sync()
        t2 = time.perf_counter()
        self.wait_s += t1 - t0
        self.transfer_s += t2 - t1
        return result

    def __enter__(self) -> "_CollectiveTimer":
        self.dist.all_to_all_single = self
        return self

    def __exit__(self, *exc) -> None:
        self.dist.all_to_all_single = self.original


def _worker(args: argparse.Namespace) -> None:
    """One torchrun rank."""
    import torch.distributed as dist

    from moekit.distributed import ExpertParallelMoE, init_distributed, make_groups

    torch.set_num_threads(1)
    shape = QUICK if args.quick else SHAPE
    init_distributed(timeout_s=300)
    groups = make_groups()
    device = groups.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    moe = _build(shape, device)
    layer = ExpertParallelMoE.from_moe(moe, groups)
    gen = torch.Generator().manual_seed(100 + groups.rank)  # each rank its own tokens
    x = torch.randn(shape["T"], shape["D"], generator=gen).to(device).requires_grad_()

    alone = groups.world_size == 1  # then the plain moekit.MoE is timed too, alternating step by step
    _steps(layer, x, args.warmup, sync)
    if alone:
        _steps(moe, x, args.warmup, sync)
    times = torch.zeros(2, args.steps, dtype=torch.float64)
    dist.barrier(group=groups.world_group)
    for i in range(args.steps):
        times[0, i] = _steps(layer, x, 1, sync)
        if alone:
            times[1, i] = _steps(moe, x, 1, sync)
    times = times.to(device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=groups.world_group)  # a step ends when its slowest rank does
    step_s, plain_s = times.median(dim=1).values.tolist()

    with _CollectiveTimer(sync) as timer:
        timed = _steps(layer, x, args.timed_steps, sync)
    with torch.no_grad():
        counts = layer.router(x).counts()  # slots per global expert
    E_l = shape["E"] // groups.ep_size
    local = counts[groups.ep_rank * E_l : (groups.ep_rank + 1) * E_l].sum()
    row_bytes = shape["D"] * x.element_size()
    # dispatch + return, forward + backward; rows that stay on their rank cost nothing
    sent = torch.tensor([float(counts.sum() - local) * row_bytes * 4], dtype=torch.float64, device=device)
    dist.all_reduce(sent, group=groups.world_group)
    stats = torch.tensor([timer.wait_s, timer.transfer_s, timed], dtype=torch.float64, device=device) / args.timed_steps
    dist.all_reduce(stats, group=groups.world_group)
    stats /= groups.world_size

    if groups.rank == 0:
        row = {
            "world_size": groups.world_size, "backend": groups.backend, "device": str(device),
            "tokens_per_rank": shape["T"], "step_ms": step_s * 1e3,
            "tokens_per_s": groups.world_size * shape["T"] / step_s,
            "timed_step_ms": float(stats[2]) * 1e3, "wait_ms": float(stats[0]) * 1e3,
            "all_to_all_ms": float(stats[1]) * 1e3, "compute_ms": float(stats[2] - stats[0] - stats[1]) * 1e3,
            "all_to_all_fraction": float(stats[1] / stats[2]),
            "bytes_exchanged_per_step": float(sent), "bytes_per_token": float(sent) / (groups.world_size * shape["T"]),
            "plain_moe_step_ms": plain_s * 1e3 if alone else None,
        }
        Path(args.worker_out).write_text(json.dumps(row))
    dist.destroy_process_group()


def _launch(nproc: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"world{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--worker-out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--timed-steps", str(args.timed_steps)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {nproc} processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _markdown(rows: list[dict], shape: dict, env: dict) -> str:
    from moekit.reporting import markdown_table

    base = rows[0]["tokens_per_s"]
    table = markdown_table(
        ["processes", "backend", "tokens/s (all ranks)", "x 1 process", "step ms", "timed step ms: compute",
         "wait (imbalance)", "all-to-all", "all-to-all share", "MB exchanged / step", "bytes / token", "plain MoE step ms"],
        [[r["world_size"], r["backend"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base:.2f}",
          f"{r['step_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['wait_ms']:.1f}", f"{r['all_to_all_ms']:.1f}",
          f"{100 * r['all_to_all_fraction']:.1f}%", f"{r['bytes_exchanged_per_step'] / 1e6:.2f}",
          f"{r['bytes_per_token']:,.0f}", "-" if r["plain_moe_step_ms"] is None else f"{r['plain_moe_step_ms']:.1f}"]
         for r in rows],
    )
    return (f"# Expert-parallel layer (weak scaling)\n\nTop-2 SwiGLU MoE, T={shape['T']} tokens per rank, D={shape['D']}, "
            f"F={shape['F']}, E={shape['E']} experts sharded over all ranks, fp32 forward+backward, one thread per "
            f"process; torch {env['torch']}, {env['processor']}.\nStep ms: median over steps of the slowest rank's step "
            "(the plain moekit.MoE is timed in alternation with the 1-process layer). Breakdown "
            "(mean over ranks, steps with timers): wait = barrier before each all-to-all (load imbalance), "
            "all-to-all = the exchanges (counts, tokens, results; forward + backward), compute = the rest. "
            "Bytes count rows that leave their rank (dispatch + return, forward + backward).\n\n" + table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timed-steps", type=int, default=None, help="steps with collective timers")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (3 if args.quick else 20)
    args.timed_steps = args.timed_steps or (2 if args.quick else 5)
    if args.worker:
        _worker(args)
        return
    from moekit.reporting import environment, write_json, atomic_write_text

    counts = [1, 2]
    if torch.cuda.is_available():
        counts = sorted({1, min(2, torch.cuda.device_count())})
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_launch(n, args, Path(tmp)) for n in counts]
    shape = QUICK if args.quick else SHAPE
    env = environment()
    for r in rows:
        print(f"{r['world_size']} process(es): {r['tokens_per_s']:,.0f} tokens/s, step {r['step_ms']:.1f} ms, "
              f"compute {r['compute_ms']:.1f} ms, wait {r['wait_ms']:.1f} ms, "
              f"all-to-all {r['all_to_all_ms']:.1f} ms ({100 * r['all_to_all_fraction']:.0f}%), "
              f"{r['bytes_exchanged_per_step'] / 1e6:.2f} MB/step")
    name = "bench_expert_parallel_quick" if args.quick else "bench_expert_parallel"
    out = Path(args.out_dir)
    write_json(out / f"{name}.json", {"shape": shape, "steps": args.steps, "rows": rows, "environment": env})
    atomic_write_text(out / f"{name}.md", _markdown(rows, shape, env))
    print(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    main()
