"""``moekit reproduce <experiment>``: run one of the papers' comparisons and write a report.

Each experiment module in ``moekit.experiments`` that defines ``add_reproduce_parser(subparsers)``
adds ``moekit reproduce <name>`` (it sets ``func`` on its parser).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("reproduce", help="reproduce a paper's comparison (writes a report)")
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    package = importlib.import_module("moekit.experiments")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"moekit.experiments.{info.name}")
        if hasattr(module, "add_reproduce_parser"):
            module.add_reproduce_parser(experiments)
    parser.set_defaults(func=lambda args: _missing(parser))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 1
