"""``moekit reproduce constraints``: soft vs hard balancing constraints for MoE layers in CNNs (Pavlitska et al.)."""

from __future__ import annotations

import argparse
from typing import Any

from .._experiment import add_experiment_parser, run_experiment
from .._options import INT, INTS, OPTIONAL_INT, SEEDS, TEXT, THREADS, WORDS, ConfigOption

WORDS_ = ("moekit", "reproduce", "constraints")

OPTIONS = (
    ConfigOption("--data", TEXT, "digits, domain-digits, cifar10 or cifar100"),
    ConfigOption("--data-dir", TEXT, "directory with the CIFAR binary files (for cifar10 / cifar100)", metavar="DIR"),
    ConfigOption("--image-size", INT, "digits: upscaled image size", low=8),
    ConfigOption("--width", INT, "ResNet-18 width (64 = the original)", low=1),
    ConfigOption("--positions", INTS, "MoE positions, stages 1-4, comma-separated", metavar="P,P,..."),
    ConfigOption("--experts", INTS, "numbers of experts E, comma-separated", field="num_experts", metavar="E,E,...",
                 low=1),
    ConfigOption("--constraints", WORDS, "losses, balancers or none, comma-separated", metavar="C,C,..."),
    SEEDS,
    ConfigOption("--epochs", INT, "training epochs", low=1),
    ConfigOption("--batch-size", INT, "batch size", low=1),
    ConfigOption("--num-train", OPTIONAL_INT, "a random subset of the training images ('all' keeps them)", low=1),
    ConfigOption("--num-test", OPTIONAL_INT, "a random subset of the test images ('all' keeps them)", low=1),
    THREADS,
)


def register(experiments: Any) -> None:
    from ...experiments.constraints import ConstraintsConfig

    add_experiment_parser(
        experiments, WORDS_, ConstraintsConfig(), OPTIONS, run,
        help="soft vs hard balancing constraints for MoE layers in CNNs (Pavlitska et al.)",
        description="ResNet-18 with one stage replaced by an MoE, trained with each soft (loss) and hard (masking) "
        "constraint over several seeds (new split each); paired 95% intervals for soft vs hard on accuracy, "
        "balance, specialisation and the drop at k = 1; specialisation plots and checkpoints of the first seed.",
        what="report.md, results.json, PNGs and checkpoints",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ...experiments.constraints import ConstraintsConfig, run_constraints

    return run_experiment(args, WORDS_, ConstraintsConfig, OPTIONS, run_constraints, inputs=("data_dir",))
