"""Entry point of the ``moekit`` command.

Every module in ``moekit.cli`` that defines ``register(subparsers)`` adds a subcommand; the
subcommand's parser sets ``func`` (called with the parsed args, returns an exit code).
User errors -- bad arguments (refused by argparse, ``HelpParser.error``) and bad values, missing or
unreadable files, unwritable outputs (``USER_ERRORS``, raised by the command) -- print one line,
``moekit <command>: error: <message>``, without a traceback and exit 2 (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ._help import HelpParser, command_summary, one_line

#: ``OSError`` covers missing, unreadable and unwritable files (FileNotFoundError, PermissionError, ...)
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, KeyError)


def commands() -> dict[str, str]:
    """``{command: one-line summary}`` of every subcommand module (those defining ``register``), read
    from the module's source without importing it: the first paragraph of its docstring, without the
    leading ``moekit <command>``."""
    package = importlib.import_module("moekit.cli")
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in ("main", "__main__") or info.name.startswith("_"):
            continue
        base = Path(package.__path__[0])
        source = base / info.name / "__init__.py" if info.ispkg else base / f"{info.name}.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "register" for node in tree.body):
            found[info.name] = command_summary(ast.get_docstring(tree) or info.name)
    return found


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``moekit`` parser. With ``argv``, only the command it names is built (imported) in full and
    the others appear with their summary, so ``moekit --help`` imports no torch; without, all are."""
    parser = HelpParser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=HelpParser)
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, summary in commands().items():
        if wanted is None or wanted == name:
            importlib.import_module(f"moekit.cli.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a refused argument (already printed)
        return int(done.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "experiment", None))))
        print(f"moekit {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
