"""``moekit reproduce comet``: COMET, DSelect-k, top-k and hash gates (each with local search) on multi-task data."""

from __future__ import annotations

import argparse
from typing import Any

from .._experiment import add_experiment_parser, run_experiment
from .._options import FLOAT, INT, INTS, TEXT, THREADS, WORDS, ConfigOption

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

    add_experiment_parser(
        experiments, WORDS_, CometConfig(), OPTIONS, run,
        help="COMET: tree gate, DSelect-k, top-k, hash (+ local search) on multi-task data",
        description="Random search per gate with shared hyperparameter draws, several replicates, the paper's "
        "best-by-validation statistic, k-sparsity decided on validation, paired 95% intervals, tuning curves with "
        "bootstrap bands.",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ...experiments.comet import CometConfig, run_comet

    return run_experiment(args, WORDS_, CometConfig, OPTIONS, run_comet, inputs=("idx_dir",))
