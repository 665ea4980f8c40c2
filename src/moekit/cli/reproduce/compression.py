"""``moekit reproduce compression``: every expert-compression method on a small MoE LM, step-matched, or on
a model the user points to (``--model DIR``)."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

from .._experiment import add_experiment_parser, run_experiment, smoke_help
from .._options import FLOATS, INT, SEEDS, THREADS, WORDS, ConfigOption, Kind

WORDS_ = ("moekit", "reproduce", "compression")

DIRECTORY = Kind(str, lambda v: "none" if v is None else str(v), "a directory")
SOURCES = Kind(WORDS.parse, WORDS.show, "comma-separated sources ('stdlib' or files)")

OPTIONS = (
    ConfigOption("--methods", WORDS, "methods to run, comma-separated (see the description)", metavar="M,M,..."),
    ConfigOption("--removed", FLOATS, "fractions of each layer's experts removed, comma-separated", metavar="F,F,...",
                 low=0),  # fmt: skip
    SEEDS,
    ConfigOption("--train-steps", INT, "training steps of each seed's MoE LM", low=1),
    ConfigOption("--recovery-steps", INT, "recovery steps of every variant (the control too; 0: no recovery, the "
                 "default with --model; a Hugging Face --model allows only 0: KD recovery trains moekit models)",
                 low=0),  # fmt: skip
    ConfigOption("--items", INT, "multiple-choice items", low=1),
    THREADS,
    ConfigOption("--model", DIRECTORY, "compare on this Hugging Face model directory (a supported family) or moekit "
                 "checkpoint instead of training an LM (only read); each variant goes through moekit compress's "
                 "streamed pipeline", metavar="DIR"),  # fmt: skip
    ConfigOption("--calib", SOURCES, "with --model: calibration sources as moekit compress --calib reads them "
                 "('stdlib': the stdlib training files; text or token-id files), comma-separated; each seed draws "
                 "its own sample", metavar="SOURCE,..."),  # fmt: skip
    ConfigOption("--data", SOURCES, "with --model: evaluation sources as moekit eval --data reads them ('stdlib': "
                 "the held-out stdlib files), comma-separated, none of them a --calib file", metavar="SOURCE,..."),  # fmt: skip
)


def register(experiments: Any) -> None:
    from ...experiments.compression import METHODS, CompressionConfig

    parser = add_experiment_parser(
        experiments, WORDS_, CompressionConfig(), OPTIONS, run,
        help="every expert-compression method (REAP, HC-SMoE, MoNE, M-SMoE, ...) on a small MoE LM or your model",
        description="Trains a byte-level MoE LM per seed, removes 25% and 50% of each layer's experts with every "
        "method, with and without the same recovery steps (a no-compression control gets them too), and evaluates "
        "held-out bits/byte, multiple choice and generation with paired 95% intervals. With --model DIR nothing is "
        "trained: every method compresses that model as moekit compress does (recovery only for moekit checkpoints, "
        "on request), and each result is "
        "evaluated paired against the original, calibrated on --calib and evaluated on --data. Methods: "
        + "; ".join(f"{m}: {d}" for m, d in METHODS.items()) + ".",
        quick_help=smoke_help("tiny model and data; with --model: tiny calibration and evaluation"),
    )  # fmt: skip
    parser.add_argument("--keep-models", action="store_true",
                        help="with --model: keep every compressed model in --out/models/seed<S>-<method>-<fraction> "
                        "(default: each is written to a temporary directory and removed once evaluated)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ...experiments.compression import CompressionConfig, run_compression

    if args.cfg_model is not None and args.cfg_recovery_steps is None:
        args.cfg_recovery_steps = "0"  # KD recovery of Hugging Face models is not offered (see --recovery-steps)
    return run_experiment(args, WORDS_, CompressionConfig, OPTIONS, partial(run_compression, keep_models=args.keep_models),
                          inputs=("model",))  # fmt: skip
