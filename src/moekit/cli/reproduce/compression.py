"""``moekit reproduce compression``: every expert-compression method on a small MoE LM, step-matched."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import FLOATS, INT, SEEDS, THREADS, WORDS, ConfigOption, add_config_options, add_out
from .._options import add_quiet, checked_out, command_line, config_from_args, progress_from

WORDS_ = ("moekit", "reproduce", "compression")

OPTIONS = (
    ConfigOption("--methods", WORDS, "methods to run, comma-separated (see the description)", metavar="M,M,..."),
    ConfigOption("--removed", FLOATS, "fractions of each layer's experts removed, comma-separated", metavar="F,F,...",
                 low=0),  # fmt: skip
    SEEDS,
    ConfigOption("--train-steps", INT, "training steps of each seed's MoE LM", low=1),
    ConfigOption("--recovery-steps", INT, "recovery steps of every variant (the control too)", low=1),
    ConfigOption("--items", INT, "multiple-choice items", low=1),
    THREADS,
)


def register(experiments: Any) -> None:
    from ...experiments.compression import METHODS, CompressionConfig

    p = experiments.add_parser(
        "compression", help="every expert-compression method (REAP, HC-SMoE, MoNE, M-SMoE, ...) on a small MoE LM",
        description="Trains a byte-level MoE LM per seed, removes 25% and 50% of each layer's experts with every "
        "method, with and without the same recovery steps (a no-compression control gets them too), and evaluates "
        "held-out bits/byte, multiple choice and generation with paired 95% intervals. Methods: "
        + "; ".join(f"{m}: {d}" for m, d in METHODS.items()) + ".",
    )  # fmt: skip
    add_out(p, "reproduce", "compression")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny model and data; the other "
                   "options apply on top); its report is labelled as such and gives no verdicts")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, CompressionConfig())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...experiments.compression import CompressionConfig, run_compression

    base = CompressionConfig.quick() if args.quick else CompressionConfig()
    cfg = config_from_args(args, OPTIONS, base)
    cfg.check()
    checked_out(args)
    command = command_line(WORDS_, cfg, OPTIONS, base, flags=["--quick"] if args.quick else [])
    run_compression(cfg, args.out, overwrite=args.overwrite, progress=progress_from(args), command=command,
                    smoke_run=args.quick)
    print(f"report written to {args.out}/report.md")
    return 0
