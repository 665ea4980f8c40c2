"""``moekit reproduce mcsmoe``: MC-SMoE -- merge, then compress, a byte-level MoE language model."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import INT, SEED, ConfigOption, add_config_options, add_out, add_quiet, checked_out, config_from_args
from .._options import progress_from

OPTIONS = (
    SEED,
    ConfigOption("--train-steps", INT, "training steps of the full MoE LM", low=1),
    ConfigOption("--recovery-steps", INT, "recovery fine-tuning steps of each merged model (KD, routers frozen)",
                 low=1),  # fmt: skip
    ConfigOption("--compress-steps", INT, "low-rank + sparse compression steps of each M-SMoE model", low=1),
)


def register(experiments: Any) -> None:
    from ...experiments.mcsmoe import McSmoeConfig

    p = experiments.add_parser(
        "mcsmoe", help="MC-SMoE: merge, then compress, a byte-level MoE LM",
        description="Train a byte-level MoE LM on the Python standard library sources, merge it to 4 and 2 experts "
        "per layer with M-SMoE, its baselines and ablations (with and without recovery fine-tuning), then compress "
        "the M-SMoE models; one table of validation bits per byte, parameters, FLOPs, checkpoint size and time.",
    )  # fmt: skip
    add_out(p, "reproduce", "mcsmoe", what="report.md, results.json and a PNG")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny model and data; the other "
                   "options apply on top)")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, McSmoeConfig())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...experiments.mcsmoe import McSmoeConfig, run_mcsmoe

    cfg = config_from_args(args, OPTIONS, McSmoeConfig.quick() if args.quick else McSmoeConfig())
    checked_out(args)
    run_mcsmoe(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet, smoke_run=args.quick,
               progress=progress_from(args))  # fmt: skip
    print(f"report written to {args.out}/report.md")
    return 0
