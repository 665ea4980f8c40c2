"""``moekit reproduce constraints``: soft vs hard balancing constraints for MoE layers in CNNs (Pavlitska et al.)."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import INT, INTS, OPTIONAL_INT, SEEDS, TEXT, THREADS, WORDS, ConfigOption, add_config_options
from .._options import add_out, add_quiet, checked_out, command_line, config_from_args, progress_from

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

    p = experiments.add_parser(
        "constraints", help="soft vs hard balancing constraints for MoE layers in CNNs (Pavlitska et al.)",
        description="ResNet-18 with one stage replaced by an MoE, trained with each soft (loss) and hard (masking) "
        "constraint over several seeds (new split each); paired 95% intervals for soft vs hard on accuracy, "
        "balance, specialisation and the drop at k = 1; specialisation plots and checkpoints of the first seed.",
    )  # fmt: skip
    add_out(p, "reproduce", "constraints", what="report.md, results.json, PNGs and checkpoints")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny data; the other options apply "
                   "on top); its report is labelled as such and gives no verdicts")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, ConstraintsConfig())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...experiments.constraints import ConstraintsConfig, run_constraints

    base = ConstraintsConfig.quick() if args.quick else ConstraintsConfig()
    cfg = config_from_args(args, OPTIONS, base)
    checked_out(args, inputs=[cfg.data_dir])
    command = command_line(WORDS_, cfg, OPTIONS, base, flags=["--quick"] if args.quick else [])
    run_constraints(cfg, args.out, overwrite=args.overwrite, progress=progress_from(args), command=command,
                    smoke_run=args.quick)
    print(f"report written to {args.out}/report.md")
    return 0
