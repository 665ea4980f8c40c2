"""Integrations with other libraries, imported lazily so that ``import moekit`` never imports them.

``moekit.integrations.hf`` (needs ``transformers>=5``): Hugging Face MoE families. Its main
functions are also reachable here: ``moekit.integrations.routing_sources`` etc.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HF_EXPORTS"]

#: names re-exported lazily from ``moekit.integrations.hf``
HF_EXPORTS = (
    "routing_sources",
    "merge_hf_model",
    "save_hf_model",
    "load_hf_model",
    "family_for",
    "list_families",
)


def __getattr__(name: str) -> Any:
    if name in HF_EXPORTS:
        return getattr(importlib.import_module(".hf", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
