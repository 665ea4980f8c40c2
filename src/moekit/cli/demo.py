"""``moekit demo``: the main job -- MoE classifiers with several routers on embedded digits."""

from __future__ import annotations

import argparse
import sys
from typing import Any

QUICK_EPOCHS = 2


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train MoE classifiers with several routers and balancing losses on embedded digits",
        description="Train one small MoE classifier per router/balancing configuration on scikit-learn's "
        "digits, print a table (accuracy, CV, living experts, time) and write report.md, results.json "
        "and utilisation.png into --out.",
    )
    p.add_argument("--out", default="moekit-runs/demo", help="output directory (default: %(default)s)")
    p.add_argument("--routers", default=None,
                   help="comma-separated router names to run, e.g. topk,hash (default: all configurations)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per configuration (default: %(default)s)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data split and initialisation seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per configuration, for smoke tests")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: %(default)s; the models are small, more threads only add "
                   "synchronisation)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..experiments.demo import run_demo

    routers = [r.strip() for r in args.routers.split(",") if r.strip()] if args.routers else None
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    run_demo(
        args.out,
        routers=routers,
        epochs=QUICK_EPOCHS if args.quick else args.epochs,
        num_experts=args.experts,
        seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(f"report written to {args.out}/report.md")
    return 0
