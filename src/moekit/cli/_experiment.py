"""The shell every experiment command shares (``moekit demo``, ``moekit reproduce <experiment>``).

The parser: ``--out``/``--overwrite``, ``--quick``, ``--quiet`` and the experiment's config options. A run: the
config from the arguments (on top of the quick config with ``--quick``), checked with ``--out`` and the input
folders before any work, the command line recorded in the results, the experiment, and the report's path.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping, Sequence

from ._options import ConfigOption, add_config_options, add_out, add_quiet, checked_out, command_line
from ._options import config_from_args, progress_from

__all__ = ["smoke_help", "SMOKE_HELP", "add_experiment_parser", "run_experiment"]


def smoke_help(shrunk: str) -> str:
    """The help of ``--quick``, saying what the smoke run shrinks (``shrunk``: "tiny data", ...)."""
    return (f"a smoke run in seconds ({shrunk}; the other options apply on top); its report is labelled as such "
            "and gives no verdicts")  # fmt: skip


SMOKE_HELP = smoke_help("tiny data")


def add_experiment_parser(subparsers: Any, words: Sequence[str], defaults: Any, options: Sequence[ConfigOption],
                          run: Callable[[argparse.Namespace], int], *, help: str, description: str,
                          quick_help: str = SMOKE_HELP,
                          what: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """The parser of the command ``words`` (e.g. ``("moekit", "reproduce", "smear")``), named by its last word,
    writing under ``moekit-runs/<words after moekit>`` (``what``: what it writes there) and calling ``run``."""
    parser = subparsers.add_parser(words[-1], help=help, description=description)
    add_out(parser, *words[1:], **({"what": what} if what else {}))
    parser.add_argument("--quick", action="store_true", help=quick_help)
    add_quiet(parser)
    add_config_options(parser, options, defaults)
    parser.set_defaults(func=run)
    return parser


def run_experiment(args: argparse.Namespace, words: Sequence[str], config_type: Any, options: Sequence[ConfigOption],
                   experiment: Callable[..., Mapping[str, Any]], *, inputs: Sequence[str] = (),
                   summary: Callable[[Mapping[str, Any]], str] | None = None) -> int:  # fmt: skip
    """Run ``experiment(cfg, args.out, ...)`` with the config of ``args`` (``config_type.quick()`` under
    ``--quick``, else ``config_type()``, then the given options); ``inputs`` name the config fields that are
    input paths (never written over). ``summary(results)`` is echoed before the report's path."""
    base = config_type.quick() if args.quick else config_type()
    cfg = config_from_args(args, options, base)
    cfg.check()
    checked_out(args, inputs=[getattr(cfg, name) for name in inputs])
    command = command_line(words, cfg, options, base, flags=["--quick"] if args.quick else [])
    progress = progress_from(args)
    results = experiment(cfg, args.out, overwrite=args.overwrite, progress=progress, command=command,
                         smoke_run=args.quick)  # fmt: skip
    if summary is not None:
        progress.echo(summary(results))
    print(f"report written to {args.out}/report.md")
    return 0
