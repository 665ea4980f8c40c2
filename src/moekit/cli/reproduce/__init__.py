"""``moekit reproduce <experiment>``: run one of the papers' comparisons and write a report.

Each module of this package defines ``register(experiments)`` and adds one experiment (one file per
subcommand); it imports its experiment only when run, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("reproduce", help="reproduce a paper's comparison (writes a report)",
                                   description="Run one paper's comparison at CPU scale and write report.md, "
                                   "results.json and PNGs (default under moekit-runs/reproduce/<experiment>).")
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(experiments)
    parser.set_defaults(func=lambda args: _missing(parser))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 1
