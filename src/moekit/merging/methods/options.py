"""Option declarations of the expert methods, for front ends that build flags from the registry.

A method's options are the keyword-only arguments of its constructor; ``method_options(name)``
returns each one's name, default, value type (``str``, ``int``, ``float``, ``bool``, or ``str`` for
anything else, e.g. ``anchor: str | int``) and help text: the parenthesis after ````name```` in the
class docstring's ``Options:`` line (empty when the docstring does not describe it). A CLI can add
``--<method>-<option>`` flags (or ``--option``) from this without knowing the methods; values are
given back as ``create_method(name, **{option: value})``.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

from ...registry import EXPERT_METHODS

__all__ = ["MethodOption", "method_options", "parse_option"]


@dataclass(frozen=True)
class MethodOption:
    """One option: ``name`` (Python keyword), ``default``, ``type`` (str/int/float/bool), ``help``."""

    name: str
    default: Any
    type: type
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _value_type(annotation: Any, default: Any) -> type:
    if isinstance(annotation, str):  # postponed annotations; "bool | None" is a bool option
        parts = [a.strip() for a in annotation.split("|") if a.strip() != "None"]
        annotation = {"str": str, "int": int, "float": float, "bool": bool}.get(parts[0], annotation) if len(parts) == 1 else annotation
    if annotation in (str, int, float, bool):
        return annotation
    if isinstance(default, (bool, int, float, str)) and typing.get_origin(annotation) is None:
        return type(default)
    return str


def _help(doc: str, name: str) -> str:
    m = re.search(rf"``{re.escape(name)}``\s*\(((?:[^()]|\([^()]*\))*)\)", doc)
    return " ".join(m.group(1).replace("``", "").split()) if m else ""


def method_options(method: str) -> list[MethodOption]:
    """The options of a registered method (``moekit.registry.EXPERT_METHODS``)."""
    cls = EXPERT_METHODS.get(method)
    doc = inspect.getdoc(cls) or ""
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        out.append(MethodOption(p.name, p.default, _value_type(p.annotation, p.default), _help(doc, p.name)))
    return out


def parse_option(option: MethodOption, text: str) -> Any:
    """A command-line string as the option's value (``bool``: true/false/1/0/yes/no; ``str`` options
    whose default is an int, such as ``anchor``, take ints too)."""
    if option.type is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{option.flag} must be true or false, got {text!r}")
    if option.type is str:
        return int(text) if re.fullmatch(r"-?\d+", text) and isinstance(option.default, int) else text
    try:
        return option.type(text)
    except ValueError:
        raise ValueError(f"{option.flag} must be {option.type.__name__}, got {text!r}") from None
