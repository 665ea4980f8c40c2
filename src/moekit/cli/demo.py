"""``moekit demo``: the main job -- MoE classifiers with several routers on embedded digits."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="train MoE classifiers with several routers on embedded digits")
    p.add_argument("--out", default="moekit-runs/demo", help="output directory (default: %(default)s)")
    p.add_argument("--routers", default=None, help="comma-separated router names to run (default: all)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few epochs, for smoke tests")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..experiments.demo import run_demo

    routers = [r.strip() for r in args.routers.split(",")] if args.routers else None
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(
        args.out,
        routers=routers,
        epochs=2 if args.quick else args.epochs,
        num_experts=args.experts,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    print(f"report written to {args.out}/report.md")
    return 0
