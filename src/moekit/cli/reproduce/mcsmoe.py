"""``moekit reproduce mcsmoe``: MC-SMoE's merging and compression against its baselines and ablations on a byte-level MoE LM."""

from __future__ import annotations

import argparse
from typing import Any

from .._experiment import add_experiment_parser, run_experiment, smoke_help
from .._options import FLOAT, INT, SEEDS, TEXT, THREADS, WORDS, ConfigOption

WORDS_ = ("moekit", "reproduce", "mcsmoe")

OPTIONS = (
    ConfigOption("--variants", WORDS, "merged variants to run, comma-separated (see the description)",
                 metavar="V,V,..."),
    SEEDS,
    ConfigOption("--experts", INT, "average experts per merged layer", low=1),
    ConfigOption("--train-steps", INT, "training steps of the SMoE", low=1),
    ConfigOption("--recovery-steps", INT, "recovery steps of every variant and of the no-merge control", low=1),
    ConfigOption("--anchor", TEXT, "alignment anchor: first (each group's lowest id, as the official code), "
                 "dominant, or an expert id"),
    ConfigOption("--test-files", INT, "held-out files per seed (one scored span each)", low=1),
    ConfigOption("--rank", INT, "MC-SMoE: rank of the low-rank factors", low=1),
    ConfigOption("--final-ratio", FLOAT, "MC-SMoE: kept fraction of the residual's rows", low=0),
    THREADS,
)


def register(experiments: Any) -> None:
    from ...experiments.mcsmoe import VARIANTS, McSmoeConfig

    add_experiment_parser(
        experiments, WORDS_, McSmoeConfig(), OPTIONS, run,
        help="MC-SMoE: merge, then compress, a byte-level MoE LM, against its baselines and ablations",
        description="A byte-level MoE LM trained on the Python standard library, merged with M-SMoE, its baselines "
        "and ablations (first layer kept whole), every variant and a no-merge control recovered with the same "
        "steps; MC-SMoE compresses the merge within the same steps. Several seeds (new held-out files and model "
        "each), held-out bits per byte per document, paired 95% intervals. Variants: "
        + "; ".join(f"{k}: {v.label}" for k, v in VARIANTS.items()) + ".",
        quick_help=smoke_help("tiny model and data"),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ...experiments.mcsmoe import McSmoeConfig, run_mcsmoe

    return run_experiment(args, WORDS_, McSmoeConfig, OPTIONS, run_mcsmoe)
