"""The ``CompressionSpec`` of a merge front's ``method`` argument: a recipe of
``moekit.registry.MERGE_METHODS`` (``mcsmoe``, ``prune``, ``uniform``, ``random``: M-SMoE and its
ablations, which take precedence for those names) or any other method of ``EXPERT_METHODS``
(``reap``, ``ean``, ``hc-smoe``, ``mone``, ``nae``, ``frequency``, ...). Keyword options a method
does not declare (e.g. a front's ``seed`` for a method without one) are dropped.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ...registry import EXPERT_METHODS, MERGE_METHODS
from .base import option_names

__all__ = ["front_spec"]


def front_spec(
    method: str, options: Mapping[str, Any], *, experts: int | float, budget: str, form: str,
    exclude: Sequence[str], max_tokens: int, protect_super_experts: bool,
) -> Any:  # fmt: skip
    """The spec a merge front runs (statistics of the original model: ``propagate="original"``)."""
    from ..pipeline import CompressionSpec

    common = dict(experts=experts, budget=budget, form=form, exclude=tuple(exclude), propagate="original",
                  protect_super_experts=protect_super_experts)  # fmt: skip
    if method in MERGE_METHODS:
        return CompressionSpec(method="m-smoe", method_options={"recipe": method, "max_tokens": max_tokens, **options},
                               **common)  # fmt: skip
    if method not in EXPERT_METHODS:
        names = sorted(set(MERGE_METHODS.names()) | set(EXPERT_METHODS.names()))
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(names)}")
    declared = set(option_names(method))
    unknown = sorted(k for k in options if k not in declared and k != "seed")
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options: {sorted(declared) or 'none'}")
    kept = {k: v for k, v in options.items() if k in declared}
    if "max_tokens" in declared:
        kept.setdefault("max_tokens", max_tokens)
    return CompressionSpec(method=method, method_options=kept, **common)
