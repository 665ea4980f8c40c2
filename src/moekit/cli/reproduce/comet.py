"""``moekit reproduce comet``: COMET, DSelect-k, top-k and hash gates (each with local search) on multi-task data."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import FLOAT, INT, INTS, TEXT, THREADS, WORDS, ConfigOption, add_config_options, add_out
from .._options import add_quiet, checked_out, command_line, config_from_args, progress_from

WORDS_ = ("moekit", "reproduce", "comet")

OPTIONS = (
    ConfigOption("--gates", WORDS, "gates to tune, comma-separated", metavar="G,G,..."),
    ConfigOption("--datasets", WORDS, "data sets, comma-separated (multimnist, multifashion need --idx-dir)",
                 metavar="D,D,..."),
    ConfigOption("--replicates", INTS, "one seed per search replicate (new data set and hyperparameter draws)",
                 metavar="S,S,...", low=0),
    ConfigOption("--trials", INT, "random-search trials per gate and replicate", low=1),
    ConfigOption("--epochs", INT, "training epochs per trial (the best-validation epoch is kept)", low=1),
    ConfigOption("--plus-gamma", FLOAT, "the fixed gamma of DSelect-k+ and COMET+", low=0),
    ConfigOption("--idx-dir", TEXT, "directory with mnist/ and fashion/ IDX files", metavar="DIR"),
    THREADS,
)


def register(experiments: Any) -> None:
    from ...experiments.comet import CometConfig

    p = experiments.add_parser(
        "comet", help="COMET: tree gate, DSelect-k, top-k, hash (+ local search) on multi-task data",
        description="Random search per gate with shared hyperparameter draws, several replicates, the paper's "
        "best-by-validation statistic, k-sparsity decided on validation, paired 95% intervals, tuning curves with "
        "bootstrap bands.",
    )  # fmt: skip
    add_out(p, "reproduce", "comet")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny data; the other options apply "
                   "on top); its report is labelled as such and gives no verdicts")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, CometConfig())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...experiments.comet import CometConfig, run_comet

    base = CometConfig.quick() if args.quick else CometConfig()
    cfg = config_from_args(args, OPTIONS, base)
    checked_out(args, inputs=[cfg.idx_dir])
    command = command_line(WORDS_, cfg, OPTIONS, base, flags=["--quick"] if args.quick else [])
    run_comet(cfg, args.out, overwrite=args.overwrite, progress=progress_from(args), command=command,
              smoke_run=args.quick)
    print(f"report written to {args.out}/report.md")
    return 0
