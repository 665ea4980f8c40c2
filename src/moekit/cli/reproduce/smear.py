"""``moekit reproduce smear``: SMEAR against every routing baseline of the paper on multi-domain digits."""

from __future__ import annotations

import argparse
from typing import Any

from .._experiment import add_experiment_parser, run_experiment
from .._options import FLOAT, INT, OPTIONAL_INT, SEEDS, THREADS, WORDS, ConfigOption

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

    add_experiment_parser(
        experiments, WORDS_, SmearConfig(), OPTIONS, run,
        help="SMEAR: merged-expert adapters vs tag, hash, top-1, estimators, merging and ensembles",
        description="Adapters on a frozen CNN, routed per image, one expert per domain; every method of the SMEAR "
        "paper, several seeds (new split and backbone each), validation-based early stopping, paired 95% intervals "
        "against SMEAR. Methods: " + "; ".join(f"{m}: {d}" for m, d in METHODS.items()) + ".",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ...experiments.smear import SmearConfig, run_smear

    return run_experiment(args, WORDS_, SmearConfig, OPTIONS, run_smear)
