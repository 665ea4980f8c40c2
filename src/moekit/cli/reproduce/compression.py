"""``moekit reproduce compression``: every expert-compression method on a small MoE LM, step-matched."""

from __future__ import annotations

import argparse
from typing import Any

from .._experiment import add_experiment_parser, run_experiment, smoke_help
from .._options import FLOATS, INT, SEEDS, THREADS, WORDS, ConfigOption

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

    add_experiment_parser(
        experiments, WORDS_, CompressionConfig(), OPTIONS, run,
        help="every expert-compression method (REAP, HC-SMoE, MoNE, M-SMoE, ...) on a small MoE LM",
        description="Trains a byte-level MoE LM per seed, removes 25% and 50% of each layer's experts with every "
        "method, with and without the same recovery steps (a no-compression control gets them too), and evaluates "
        "held-out bits/byte, multiple choice and generation with paired 95% intervals. Methods: "
        + "; ".join(f"{m}: {d}" for m, d in METHODS.items()) + ".",
        quick_help=smoke_help("tiny model and data"),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ...experiments.compression import CompressionConfig, run_compression

    return run_experiment(args, WORDS_, CompressionConfig, OPTIONS, run_compression)
