"""Command-line options of the expert-reduction methods, built from the ``EXPERT_METHODS`` registry.

How a method declares its options (nothing else is needed for ``moekit compress`` to offer them):

* each option is a **keyword-only constructor parameter with a type hint and a default**
  (``def __init__(self, *, anchor: str | int = "dominant", max_tokens: int = 8192)``);
* supported hints: ``int``, ``float``, ``str``, ``bool``, unions of those (``str | int``: an integer
  when the text is one, else the text) and ``X | None`` (``None`` = the method's own choice);
* optional help: a class attribute ``option_help = {"anchor": "..."}``; without it the help names the
  methods that take the option.

Every option becomes one flag, ``--anchor`` for ``anchor`` (underscores as dashes), shared by the
methods that use the same name with the same type; ``bool`` options get ``--x`` / ``--no-x``. A flag
given for a method that does not take it is refused (exit 2). ``method_options(args, method)`` returns
the keywords the user gave, ready for ``create_method``.
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["MethodOption", "declared_options", "add_method_options", "method_options", "RESERVED"]

#: flags of ``moekit compress`` itself, which a method option may not take
RESERVED = frozenset({
    "method", "experts", "budget", "form", "exclude", "pad", "propagate", "rank", "keep_residual", "recover_steps",
    "recover_lr", "max_memory", "calib", "calib_samples", "seq_len", "batch_size", "resume", "out", "overwrite",
    "quiet", "help",
})  # fmt: skip
PREFIX = "method_"


@dataclass(frozen=True)
class MethodOption:
    """One declared option: its name, the types its text may become (in order of trial), whether it
    may be ``None``, its default, and the methods that take it."""

    name: str
    types: tuple[type, ...]
    optional: bool
    default: Any
    methods: tuple[str, ...]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return PREFIX + self.name

    def parse(self, text: str) -> Any:
        """The value of ``text``: the first of ``types`` that takes it (bool options never get text)."""
        if self.optional and text.strip().lower() == "none":
            return None
        for kind in self.types:
            try:
                if kind is float:
                    value = float(text)
                    if value != value or value in (float("inf"), float("-inf")):
                        raise ValueError(text)
                    return value
                return int(text) if kind is int else str(text)
            except ValueError:
                continue
        allowed = " or ".join({int: "an integer", float: "a number", str: "text"}[k] for k in self.types)
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")


def _types(hint: Any, where: str) -> tuple[tuple[type, ...], bool]:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds = tuple(a for a in args if a is not type(None))
    if not kinds or any(k not in (int, float, str, bool) for k in kinds) or (bool in kinds and len(kinds) > 1):
        raise TypeError(f"{where}: option type {hint!r} is not supported (int, float, str, bool, unions, | None)")
    # int before float before str: "3" is an int for a ``str | int`` option
    return tuple(sorted(kinds, key=(int, float, str, bool).index)), optional


def declared_options(name: str, factory: Callable[..., Any]) -> list[MethodOption]:
    """The options one registered method declares (see the module docstring)."""
    init = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(init)
    helps = getattr(factory, "option_help", {}) or {}
    out = []
    for param in inspect.signature(init).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        where = f"compression method {name!r}, option {param.name!r}"
        if param.default is inspect.Parameter.empty or param.name not in hints:
            raise TypeError(f"{where}: options need a type hint and a default")
        if param.name in RESERVED:
            raise TypeError(f"{where}: the name is taken by a moekit compress flag")
        kinds, optional = _types(hints[param.name], where)
        out.append(MethodOption(param.name, kinds, optional, param.default, (name,), str(helps.get(param.name, ""))))
    return out


def _all_options() -> dict[str, MethodOption]:
    from ..registry import EXPERT_METHODS

    merged: dict[str, MethodOption] = {}
    for entry in EXPERT_METHODS.entries():
        for opt in declared_options(entry.name, entry.factory):
            old = merged.get(opt.name)
            if old is None:
                merged[opt.name] = opt
                continue
            if (old.types, old.optional) != (opt.types, opt.optional):
                raise TypeError(f"option {opt.name!r} has different types in methods {old.methods} and {opt.name!r}")
            merged[opt.name] = MethodOption(opt.name, old.types, old.optional, old.default, old.methods + opt.methods,
                                            old.help or opt.help)  # fmt: skip
    return merged


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per declared option of every registered method (an argument group)."""
    group = parser.add_argument_group("method options", "options of the --method (each names the methods that take it)")
    for opt in _all_options().values():
        default = "none: the method's own choice" if opt.default is None else repr(opt.default).replace("%", "%%")
        methods = ", ".join(opt.methods)
        text = f"{opt.help + '; ' if opt.help else ''}{methods} (default: {default})"
        if opt.types == (bool,):
            group.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(opt.flag, dest=opt.dest, type=opt.parse, default=None, metavar="VALUE", help=text)


def method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options given on the command line, for ``method``; ValueError for one it does not take."""
    given = {opt.name: getattr(args, opt.dest) for opt in _all_options().values() if getattr(args, opt.dest, None) is not None}
    from ..registry import EXPERT_METHODS

    own = {o.name for o in declared_options(method, EXPERT_METHODS.get(method))}
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise ValueError(f"{flags} {'is' if len(foreign) == 1 else 'are'} not an option of --method {method} "
                         f"(its options: {', '.join('--' + n.replace('_', '-') for n in sorted(own)) or 'none'})")  # fmt: skip
    return given
