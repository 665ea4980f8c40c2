"""``moekit demo``: the main job -- MoE classifiers with several routers on embedded digits."""

from __future__ import annotations

import argparse
from typing import Any

from ._options import FLOAT, INT, SEEDS, THREADS, WORDS, ConfigOption, add_config_options, add_out, add_quiet
from ._options import checked_out, command_line, config_from_args, progress_from
from ._help import command_summary

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

    p = subparsers.add_parser(
        "demo", help=SUMMARY,
        description="Train one small MoE classifier per router/balancing configuration and seed on scikit-learn's "
        "digits, print the table (accuracy with 95%% intervals, CV, living experts, time) and write report.md, "
        "results.json and utilisation.png into --out.",
    )  # fmt: skip
    add_out(p, "demo")
    p.add_argument("--quick", action="store_true", help="a smoke run (2 epochs, one seed; the other options apply on "
                   "top); its report is labelled as such")  # fmt: skip
    add_quiet(p)
    add_config_options(p, OPTIONS, DemoConfig())
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..experiments.demo import DemoConfig, run_demo
    from ..experiments.demo_report import SECTIONS

    base = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = config_from_args(args, OPTIONS, base)
    checked_out(args)
    command = command_line(("moekit", "demo"), cfg, OPTIONS, base, flags=["--quick"] if args.quick else [])
    progress = progress_from(args)
    results = run_demo(cfg, args.out, overwrite=args.overwrite, progress=progress, command=command,
                       smoke_run=args.quick)
    progress.echo("\n" + SECTIONS["results"](results))
    print(f"report written to {args.out}/report.md")
    return 0
