"""Where routed adapters go: matching sites by name or type, their output width, and whether they sit
inside a causal decoder (so that their routing must not look at future tokens)."""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn

__all__ = ["ADAPTERS_ATTR", "Sites", "match_sites", "infer_dim", "is_causal_site"]

#: the attribute of the model that holds the inserted adapters (never itself a site)
ADAPTERS_ATTR = "moekit_adapters"
Sites = str | type | tuple[type, ...] | Sequence[str]


def _int_attr(obj: Any, attrs: Sequence[str]) -> int | None:
    for attr in attrs:
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def infer_dim(model: nn.Module, module: nn.Module) -> int | None:
    """The site's output width: its own size attribute, else the model config's hidden size, else the
    width of its last submodule that has one (e.g. the final BatchNorm of a ResNet block)."""
    width = _int_attr(module, ("out_features", "out_channels", "hidden_size", "d_model", "n_embd", "embed_dim"))
    if width is None:
        width = _int_attr(getattr(model, "config", None), ("hidden_size", "d_model", "n_embd"))
    for sub in reversed(list(module.modules())[1:]) if width is None else ():
        width = _int_attr(sub, ("out_features", "out_channels", "num_features"))
        if width is not None:
            break
    return width


def _causal_flags(module: nn.Module) -> list[bool]:
    """``is_causal`` of every attention-like module inside ``module`` (moekit's ``CausalSelfAttention``
    and Hugging Face attention modules say it by class name or by an ``is_causal`` attribute)."""
    flags = []
    for m in module.modules():
        flag = getattr(m, "is_causal", None)
        if isinstance(flag, bool):
            flags.append(flag)
        elif "causal" in type(m).__name__.lower() and "attention" in type(m).__name__.lower():
            flags.append(True)
    return flags


def is_causal_site(model: nn.Module, name: str) -> bool:
    """A site is causal when the smallest enclosing module that holds attention holds causal attention."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        flags = _causal_flags(modules[".".join(parts[:i])])
        if flags:
            return any(flags)
    return False


def match_sites(model: nn.Module, sites: Sites) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and not n.startswith(ADAPTERS_ATTR)]
    if isinstance(sites, str):
        pattern = re.compile(sites)
        found = [n for n in names if pattern.search(n)]
    elif isinstance(sites, type) or (isinstance(sites, tuple) and sites and all(isinstance(t, type) for t in sites)):
        modules = dict(model.named_modules())
        found = [n for n in names if isinstance(modules[n], sites)]
    elif isinstance(sites, Sequence) and all(isinstance(s, str) for s in sites):
        missing = [s for s in sites if s not in names]
        if missing:
            raise ValueError(f"sites {missing[:5]} are not modules of {type(model).__name__}")
        found = list(sites)
    else:
        raise TypeError(f"sites must be a regex, a module type (or tuple of types) or a list of names, got {sites!r}")
    if not found:
        raise ValueError(f"sites={sites!r} matches no module of {type(model).__name__}")
    return found
