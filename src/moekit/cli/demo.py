"""``moekit demo``: the main job -- MoE classifiers with several routers on embedded digits."""

from __future__ import annotations

import argparse
from typing import Any

from ._experiment import add_experiment_parser, run_experiment
from ._help import command_summary
from ._options import FLOAT, INT, SEEDS, THREADS, WORDS, ConfigOption

WORDS_ = ("moekit", "demo")

OPTIONS = (
    ConfigOption("--routers", WORDS, "router names to run, comma-separated, e.g. topk,hash (empty: every "
                 "configuration)", metavar="R,R,..."),
    SEEDS,
    ConfigOption("--epochs", INT, "training epochs per configuration", low=1),
    ConfigOption("--experts", INT, "experts per MoE layer", field="num_experts", low=2),
    ConfigOption("--lr", FLOAT, "AdamW learning rate", low=0),
    THREADS,
)


SUMMARY = command_summary(__doc__ or "")  # what moekit --help lists


def register(subparsers: Any) -> None:
    from ..experiments.demo import DemoConfig

    add_experiment_parser(
        subparsers, WORDS_, DemoConfig(), OPTIONS, _run, help=SUMMARY,
        description="Train one small MoE classifier per router/balancing configuration and seed on scikit-learn's "
        "digits, print the table (accuracy with 95%% intervals, CV, living experts, time) and write report.md, "
        "results.json and utilisation.png into --out.",
        quick_help="a smoke run (2 epochs, one seed; the other options apply on top); its report is labelled as such",
    )  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from ..experiments.demo import DemoConfig, run_demo
    from ..experiments.demo_report import SECTIONS

    return run_experiment(args, WORDS_, DemoConfig, OPTIONS, run_demo,
                          summary=lambda results: "\n" + SECTIONS["results"](results))  # fmt: skip
