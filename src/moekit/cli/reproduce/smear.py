"""``moekit reproduce smear``: SMEAR against every routing baseline of the paper on multi-domain digits."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import FLOAT, INT, OPTIONAL_INT, SEEDS, THREADS, WORDS, ConfigOption, add_config_options, add_out
from .._options import add_quiet, checked_out, command_line, config_from_args, progress_from

WORDS_ = ("moekit", "reproduce", "smear")

OPTIONS = (
    ConfigOption("--methods", WORDS, "methods to run, comma-separated (see the description)", metavar="M,M,..."),
    SEEDS,
    ConfigOption("--epochs", INT, "most adapter training epochs (the best-validation epoch is kept)", low=1),
    ConfigOption("--patience", INT, "stop after this many epochs without a better validation accuracy", low=1),
    ConfigOption("--pretrain-epochs", INT, "backbone epochs on the clean domain", low=1),
    ConfigOption("--num-train", OPTIONAL_INT, "a random subset of the training images ('all' keeps them)", low=1),
    ConfigOption("--lr", FLOAT, "Adam learning rate", low=0),
    THREADS,
)


def register(experiments: Any) -> None:
    from ...experiments.smear import METHODS, SmearConfig

    p = experiments.add_parser(
        "smear", help="SMEAR: merged-expert adapters vs tag, hash, top-1, estimators, merging and ensembles",
        description="Adapters on a frozen CNN, routed per image, one expert per domain; every method of the SMEAR "
        "paper, several seeds (new split and backbone each), validation-based early stopping, paired 95% intervals "
        "against SMEAR. Methods: " + "; ".join(f"{m}: {d}" for m, d in METHODS.items()) + ".",
    )  # fmt: skip
    add_out(p, "reproduce", "smear")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny data; the other options apply "
                   "on top); its report is labelled as such and gives no verdicts")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, SmearConfig())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...experiments.smear import SmearConfig, run_smear

    base = SmearConfig.quick() if args.quick else SmearConfig()
    cfg = config_from_args(args, OPTIONS, base)
    checked_out(args)
    command = command_line(WORDS_, cfg, OPTIONS, base, flags=["--quick"] if args.quick else [])
    run_smear(cfg, args.out, overwrite=args.overwrite, progress=progress_from(args), command=command,
              smoke_run=args.quick)
    print(f"report written to {args.out}/report.md")
    return 0
