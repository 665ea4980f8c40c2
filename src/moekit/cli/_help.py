"""One help style for every ``moekit`` command.

``HelpParser`` is the parser class of ``moekit`` and, through ``add_subparsers``, of every subcommand:
its ``--help`` shows each option's default -- written by the option's help when it says ``default``
(needed where the default is ``None`` or empty and means something, e.g. "default: the run's data"),
appended as ``(default: X)`` otherwise -- and keeps indented example lines of a description as they are.
Its errors (a refused argument) are one line: ``<prog>: error: <message> (see <prog> --help)``, exit 2;
``one_line(err)`` puts a command's own error message on one line the same way.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

__all__ = ["DefaultsFormatter", "HelpParser", "command_summary", "is_empty_default", "one_line"]


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a KeyError's message without its quotes)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(message).split()) or type(err).__name__


def command_summary(doc: str) -> str:
    """A command module's one-line summary: the first paragraph of its docstring without the leading
    ``moekit <command>``: (``moekit --help`` lists it; the module's ``register`` may use it as ``help``)."""
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    if first.startswith("``") and "``:" in first:
        first = first.split("``:", 1)[1].strip()
    return first.rstrip(".")


def is_empty_default(value: Any) -> bool:
    """Whether a default says nothing by itself (None, False, empty): its option's help must explain it."""
    return value is None or value is False or (isinstance(value, (list, tuple, str)) and len(value) == 0)


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to options whose help does not mention their (non-empty) default;
    wraps description paragraphs but keeps lines indented by 4 spaces (examples) verbatim."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return text if is_empty_default(action.default) else f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = textwrap.dedent(text).strip("\n").split("\n\n")
        out = []
        for paragraph in paragraphs:
            lines = paragraph.splitlines()
            if any(line.startswith("    ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))  # fmt: skip
        return "\n\n".join(out)


class HelpParser(argparse.ArgumentParser):
    """``ArgumentParser`` with ``DefaultsFormatter`` unless told otherwise (subparsers inherit the class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """One line on stderr (not the usage block), exit status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
