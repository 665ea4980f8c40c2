"""Option helpers shared by moekit's subcommands: one spelling, one help style, one parser per idea.

* ``add_out(parser, "reproduce", "smear")``: ``--out`` (default ``moekit-runs/reproduce/smear``) and
  ``--overwrite``; ``checked_out(args, inputs=[...])``, the first thing a command does, applies
  ``moekit.reporting.check_output_dir``: ``--out`` must not be, contain or lie inside an input; an
  existing non-empty ``--out`` is refused unless ``--overwrite``, which replaces only a directory
  moekit wrote (its marker lists every file; a file moekit did not write is never deleted); the
  parent must be writable. Every command that writes a directory uses the pair.
* ``at_least(n)`` and ``positive_float``: argparse ``type=`` checkers for options outside a config.
* ``add_quiet(parser)`` and ``progress_from(args)``: ``--quiet``, and a ``Progress`` that draws bars
  on a terminal and prints plain periodic lines in a pipe or CI log.
* ``ConfigOption``: an option that sets one field of a config dataclass. ``add_config_options``
  adds them with help text showing the dataclass default, ``config_from_args`` applies the given ones
  to a base config (values are parsed after argparse, so a bad value is one-line ``ValueError``:
  exit 2), and ``command_line`` writes the command that rebuilds a config (recorded in results JSON).
  ``SEED``, ``SEEDS`` and ``THREADS`` are the common ones.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "RUNS_ROOT",
    "default_out",
    "out_for_input",
    "add_out",
    "checked_out",
    "at_least",
    "positive_float",
    "add_quiet",
    "progress_from",
    "Kind",
    "INT",
    "FLOAT",
    "TEXT",
    "INTS",
    "FLOATS",
    "WORDS",
    "OPTIONAL_INT",
    "ConfigOption",
    "SEED",
    "SEEDS",
    "THREADS",
    "add_config_options",
    "config_from_args",
    "command_line",
]

#: every command writes under this directory by default (git-ignored in the repository)
RUNS_ROOT = "moekit-runs"


def default_out(*command: str) -> str:
    """``moekit-runs/<command words>``, the default output directory of a command."""
    return "/".join((RUNS_ROOT, *command))


def out_for_input(args: argparse.Namespace, *command: str) -> str:
    """``args.out``, set first (when not given) to ``moekit-runs/<command>/<name of args.input>``, the
    default of commands that write one output per input (merge, compress)."""
    if args.out is None:
        args.out = default_out(*command, Path(args.input).resolve().name)
    return args.out


OVERWRITE_HELP = ("replace an earlier output of moekit at --out (a directory moekit did not write, or one holding "
                  "files it did not write, is never replaced)")  # fmt: skip


def add_out(parser: argparse.ArgumentParser, *command: str, what: str = "report.md, results.json and PNGs",
            required: bool = False, default_help: str | None = None) -> None:  # fmt: skip
    """``--out DIR`` and ``--overwrite``. The default is ``moekit-runs/<command>``; with no ``command``
    there is none, and ``default_help`` says what happens then (or ``required``)."""
    if command:
        default, shown = default_out(*command), "%(default)s"
    else:
        default, shown = None, default_help or "none"
    suffix = "" if required else f" (default: {shown})"
    parser.add_argument("--out", default=default, required=required, metavar="DIR",
                        help=f"output directory ({what}; absent or empty unless --overwrite){suffix}")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def checked_out(args: argparse.Namespace, *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                out: str | os.PathLike[str] | None = None) -> Path:  # fmt: skip
    """``args.out`` (or ``out``) checked as an output directory before any work
    (``moekit.reporting.check_output_dir``, errors naming ``--out``); ``None`` inputs are skipped."""
    from ..reporting import check_output_dir

    return check_output_dir(args.out if out is None else out, overwrite=args.overwrite,
                            inputs=[i for i in inputs if i is not None], name="--out")  # fmt: skip


def at_least(low: int) -> Callable[[str], int]:
    """argparse ``type=``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def experts_count(text: str) -> int | float:
    """argparse ``type=`` of ``--experts``: an integer ``>= 1`` (experts kept per layer) or a fraction in
    (0, 1) (the share of each layer's experts kept, e.g. ``0.5``)."""
    try:
        count = int(text)
    except ValueError:
        count = None
    if count is not None:
        if count < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {count}")
        return count
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or a fraction in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or a fraction in (0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_name(text: str) -> str:
    """argparse ``type=``: a torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), checked by torch."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as 'cpu' or 'cuda:0', got {text!r}") from None
    return text


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress or per-run lines, only the final path (default: progress bars on a "
                        "terminal, a plain line every 30 s in a pipe or log)")  # fmt: skip


def progress_from(args: argparse.Namespace) -> Any:
    """The ``moekit.progress.Progress`` that ``--quiet`` asks for."""
    from ..progress import Progress

    return Progress("off" if getattr(args, "quiet", False) else "auto")


@dataclass(frozen=True)
class Kind:
    """How an option's text becomes a value (``parse``, ValueError on bad text) and back (``show``)."""

    parse: Callable[[str], Any]
    show: Callable[[Any], str]
    expects: str  # for error messages: "an integer", "comma-separated integers", ...


def _number(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: cast(text.strip())


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text}")
    return value


def _list(cast: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        values = tuple(cast(t.strip()) for t in text.split(",") if t.strip())
        if not values:
            raise ValueError("empty list")
        return values

    return parse


def _join(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values)


INT = Kind(_number(int), str, "an integer")
FLOAT = Kind(_number(_finite), repr, "a finite number")
TEXT = Kind(str, str, "text")
INTS = Kind(_list(int), _join, "comma-separated integers")
FLOATS = Kind(_list(_finite), lambda v: ",".join(repr(float(x)) for x in v), "comma-separated finite numbers")
WORDS = Kind(_list(str), _join, "comma-separated names")
OPTIONAL_INT = Kind(lambda t: None if t.strip() == "all" else int(t.strip()),
                    lambda v: "all" if v is None else str(v), "an integer or 'all'")  # fmt: skip


@dataclass(frozen=True)
class ConfigOption:
    """``--flag VALUE`` that sets ``cfg.<field>`` (field defaults to the flag's name, dashes as underscores);
    ``low``: the smallest number allowed (for lists: in every element)."""

    flag: str
    kind: Kind
    help: str
    field: str | None = None
    metavar: str | None = None
    low: float | None = None

    @property
    def name(self) -> str:
        return self.field or self.flag.lstrip("-").replace("-", "_")

    @property
    def dest(self) -> str:
        return f"cfg_{self.name}"


SEED = ConfigOption("--seed", INT, "seed of the data split, initialisation and search", low=0)
SEEDS = ConfigOption("--seeds", INTS, "seeds; each gives a new data split and initialisation", metavar="S,S,...",
                     low=0)  # fmt: skip
THREADS = ConfigOption("--threads", INT, "torch CPU threads, pinned for the run and recorded in results.json "
                       "(numbers are reproducible for a given count)", metavar="N", low=1)  # fmt: skip


def add_config_options(parser: argparse.ArgumentParser, options: Sequence[ConfigOption], defaults: Any) -> None:
    """Add each option; its help shows the value it takes in ``defaults`` (a config dataclass)."""
    known = {f.name for f in fields(defaults)}
    for opt in options:
        if opt.name not in known:
            raise ValueError(f"option {opt.flag} names field {opt.name!r}, which {type(defaults).__name__} lacks")
        shown = opt.kind.show(getattr(defaults, opt.name)).replace("%", "%%")
        parser.add_argument(opt.flag, dest=opt.dest, default=None, metavar=opt.metavar or opt.name.upper(),
                            help=f"{opt.help} (default: {shown})")  # fmt: skip


def config_from_args(args: argparse.Namespace, options: Sequence[ConfigOption], base: Any) -> Any:
    """``base`` with every option the user gave applied; bad text is a ValueError naming the option."""
    changes = {}
    for opt in options:
        text = getattr(args, opt.dest, None)
        if text is None:
            continue
        try:
            value = opt.kind.parse(text)
        except ValueError:
            raise ValueError(f"{opt.flag} must be {opt.kind.expects}, got {text!r}") from None
        for v in value if isinstance(value, tuple) else (value,):
            if opt.low is not None and v is not None and v < opt.low:
                raise ValueError(f"{opt.flag} must be >= {opt.low:g}, got {v}")
        changes[opt.name] = value
    return replace(base, **changes)


def command_line(words: Sequence[str], cfg: Any, options: Sequence[ConfigOption], base: Any,
                 *, flags: Sequence[str] = ()) -> str:  # fmt: skip
    """The command that rebuilds ``cfg``: ``words``, ``flags`` (e.g. ``--quick``, which selects
    ``base``) and every option whose value differs from ``base``."""
    parts = [*words, *flags]
    for opt in options:
        value = getattr(cfg, opt.name)
        if value != getattr(base, opt.name):
            parts += [opt.flag, opt.kind.show(value)]
    return shlex.join(parts)
