"""Every per-example routing method of the SMEAR comparison, built by name on the same expert bank.

``build_routed_block("smear", bank="adapter", dim=64, num_experts=8, width=16)`` returns an
``ExampleRoutedMoE``; ``ROUTED_METHODS`` lists the names.
"""

from __future__ import annotations

from typing import Any

from .._checks import check_choice, check_int
from ..registry import EXPERTS, ROUTERS
from ..routers.base import Router
from .example_routed import ExampleRoutedMoE

__all__ = ["ROUTED_METHODS", "build_routed_block"]

#: name -> (router name or None, combine, one-line description)
ROUTED_METHODS: dict[str, tuple[str, str, str]] = {
    "smear": ("smear", "merge", "SMEAR: one expert merged with the router's probabilities"),
    "tag": ("tag", "sparse", "metadata routing: the example's tag picks its expert"),
    "hash": ("hash", "sparse", "fixed random expert per example id"),
    "top1": ("topk", "sparse", "top-1, output scaled by its probability"),
    "st_gumbel": ("st_gumbel", "sparse", "top-1 with straight-through Gumbel-softmax"),
    "reinforce": ("reinforce", "sparse", "top-1 sampled, REINFORCE with a learned baseline"),
    "dselect": ("dselect", "sparse", "DSelect-k with k=1"),
    "ensemble": ("softmax", "dense", "all experts, outputs mixed by the router (E x compute)"),
    "dense_1x_compute": ("topk", "sparse", "one expert of the same size (same compute as SMEAR)"),
    "dense_1x_params": ("topk", "sparse", "one expert E times wider (same parameters as SMEAR)"),
}

_WIDTH_ARG = {"adapter": "bottleneck", "mlp": "hidden", "glu": "hidden"}


def build_routed_block(
    method: str,
    *,
    bank: str,
    dim: int,
    num_experts: int,
    width: int,
    num_keys: int | None = None,
    tag_key: str = "tag",
    hash_key: str = "example_ids",
    bank_kwargs: dict[str, Any] | None = None,
    router_kwargs: dict[str, Any] | None = None,
    device: Any = None,
    dtype: Any = None,
) -> ExampleRoutedMoE:
    """Build one method of the comparison.

    Args:
        method: a key of ``ROUTED_METHODS``.
        bank: expert bank name (``adapter``, ``mlp``, ``glu``).
        width: the bottleneck (adapter) or hidden size (mlp/glu) of one expert.
        num_keys: number of distinct example ids (hash routing).
        tag_key, hash_key: the ``meta`` entries holding tags and example ids.
    """
    check_choice("method", method, ROUTED_METHODS)
    check_choice("bank", bank, _WIDTH_ARG)
    check_int("num_experts", num_experts, low=1)
    router_name, combine, _ = ROUTED_METHODS[method]
    if router_name not in ROUTERS:
        raise ValueError(f"method {method!r} needs router {router_name!r}, which is not available in this install")
    kw = {"device": device, "dtype": dtype}
    experts_n, expert_width = num_experts, width
    if method == "dense_1x_compute":
        experts_n = 1
    elif method == "dense_1x_params":
        experts_n, expert_width = 1, width * num_experts
    experts = EXPERTS.create(bank, num_experts=experts_n, dim=dim, **{_WIDTH_ARG[bank]: expert_width}, **(bank_kwargs or {}), **kw)
    router = _router(method, router_name, dim, experts_n, num_keys, tag_key, hash_key, router_kwargs or {}, kw)
    return ExampleRoutedMoE(router, experts, combine=combine)


def _router(method: str, name: str, dim: int, n: int, num_keys: int | None, tag_key: str, hash_key: str,
            extra: dict[str, Any], kw: dict[str, Any]) -> Router:
    args: dict[str, Any] = {"dim": dim, "num_experts": n, **kw}
    if method == "hash":
        if num_keys is None:
            raise ValueError("method 'hash' needs num_keys (the number of distinct example ids)")
        args.update(num_keys=num_keys, key=hash_key)
    elif method == "tag":
        args.update(key=tag_key)
    elif method in ("top1", "dense_1x_compute", "dense_1x_params"):
        args.update(k=1, noisy=False, renormalize=method != "top1")
    elif method == "dselect":
        args.update(k=1)
    return ROUTERS.create(name, **{**args, **extra})
