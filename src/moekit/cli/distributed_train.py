"""``python -m moekit.distributed.train`` / ``torchrun ... -m moekit.distributed.train``: the command line of
the expert-parallel trainer (``moekit.distributed.train.train_expert_parallel``)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

import torch.distributed as dist

from ..data.digits import load_digits_split
from ..distributed.checkpoint import save_distributed_checkpoint
from ..distributed.comm import ExpertParallelError
from ..distributed.groups import DEFAULT_TIMEOUT_S, init_distributed, make_groups
from ..distributed.train import OPTIMIZERS, ROUTER_CHOICES, EPTrainConfig, train_expert_parallel
from ..reporting import check_output_dir, check_writable_parent, environment, write_json
from ._help import HelpParser, one_line
from ._options import at_least, positive_float

__all__ = ["main", "PROG"]

PROG = "python -m moekit.distributed.train"
DESCRIPTION = "Expert-parallel training of a small MoE classifier on scikit-learn's digits, under torchrun."


def _parser() -> argparse.ArgumentParser:
    d = EPTrainConfig()
    p = HelpParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--steps", type=at_least(1), default=d.steps)
    p.add_argument("--batch-size", type=at_least(1), default=d.batch_size, help="global batch (split over ranks)")
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--dim", type=at_least(1), default=d.dim)
    p.add_argument("--depth", type=at_least(1), default=d.depth)
    p.add_argument("--experts", type=at_least(1), default=d.num_experts, help="experts per layer (divisible by --ep)")
    p.add_argument("--k", type=at_least(1), default=d.k)
    p.add_argument("--router", choices=ROUTER_CHOICES, default=d.router)
    p.add_argument("--noisy", action="store_true", help="noisy top-k gating")
    p.add_argument("--capacity-factor", type=positive_float, default=None,
                   help="per-rank expert capacity (default: dropless)")  # fmt: skip
    p.add_argument("--aux-free-rate", type=positive_float, default=None,
                   help="aux-loss-free bias balancing with this rate")  # fmt: skip
    p.add_argument("--z-loss", type=float, default=d.z_loss)
    p.add_argument("--log-every", type=at_least(1), default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ep", type=at_least(1), default=None, help="expert-parallel size (default: world size, i.e. dp=1)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, help="collective timeout in seconds")
    p.add_argument("--save", default=None, help="save an expert-parallel checkpoint to this directory")
    p.add_argument("--out", default=None, help="write a JSON summary here (rank 0)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a refused argument (already printed)
        return int(done.code or 0)
    distributed = "RANK" in os.environ  # set by torchrun
    try:
        config = EPTrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, dim=args.dim,
            depth=args.depth, num_experts=args.experts, k=args.k, router=args.router, noisy=args.noisy,
            capacity_factor=args.capacity_factor, aux_free_rate=args.aux_free_rate, z_loss=args.z_loss,
            log_every=args.log_every, seed=args.seed)
        if args.save:  # every rank sees the same filesystem: all refuse a bad --save before any work
            check_output_dir(args.save, name="--save")
        if args.out:
            check_writable_parent(args.out, name="--out")
        groups = None
        if distributed:
            init_distributed(backend=args.backend, timeout_s=args.timeout)
            groups = make_groups(args.ep, timeout_s=args.timeout)
            if groups.rank == 0 and not args.quiet:
                print(f"expert parallel: world={groups.world_size} ep={groups.ep_size} dp={groups.dp_size} "
                      f"backend={groups.backend}", flush=True)
        result = train_expert_parallel(config, groups, quiet=args.quiet)
        if args.save:
            data = load_digits_split(seed=config.seed)
            save_distributed_checkpoint(result.model, args.save, groups, name="ep_moe_classifier",
                                        config=config.model_config(data.num_features, int(data.y_train.max()) + 1))
        if args.out and (groups is None or groups.rank == 0):
            write_json(args.out, {"config": asdict(config), "world_size": 1 if groups is None else groups.world_size,
                                   "ep_size": 1 if groups is None else groups.ep_size, "losses": result.losses,
                                   "accuracy": result.accuracy, "seconds": result.seconds,
                                   "examples_per_s": result.examples_per_s, "environment": environment()})
    except (ValueError, TypeError, OSError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except ExpertParallelError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0
