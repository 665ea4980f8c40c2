"""``moekit reproduce mcsmoe``: MC-SMoE's merging and compression against its baselines and ablations on a byte-level MoE LM."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import FLOAT, INT, SEEDS, TEXT, THREADS, WORDS, ConfigOption, add_config_options
from .._options import add_out, add_quiet, checked_out, command_line, config_from_args, progress_from

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

    p = experiments.add_parser(
        "mcsmoe", help="MC-SMoE: merge, then compress, a byte-level MoE LM, against its baselines and ablations",
        description="A byte-level MoE LM trained on the Python standard library, merged with M-SMoE, its baselines "
        "and ablations (first layer kept whole), every variant and a no-merge control recovered with the same "
        "steps; MC-SMoE compresses the merge within the same steps. Several seeds (new held-out files and model "
        "each), held-out bits per byte per document, paired 95% intervals. Variants: "
        + "; ".join(f"{k}: {v.label}" for k, v in VARIANTS.items()) + ".",
    )  # fmt: skip
    add_out(p, "reproduce", "mcsmoe")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny model and data; the other "
                   "options apply on top); its report is labelled as such and gives no verdicts")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, McSmoeConfig())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...experiments.mcsmoe import McSmoeConfig, run_mcsmoe

    base = McSmoeConfig.quick() if args.quick else McSmoeConfig()
    cfg = config_from_args(args, OPTIONS, base)
    cfg.check()
    checked_out(args)
    command = command_line(WORDS_, cfg, OPTIONS, base, flags=["--quick"] if args.quick else [])
    run_mcsmoe(cfg, args.out, overwrite=args.overwrite, progress=progress_from(args), command=command,
               smoke_run=args.quick)
    print(f"report written to {args.out}/report.md")
    return 0
