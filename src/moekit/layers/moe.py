"""The MoE layer: a router and an expert bank composed by injection.

``MoE(router=..., experts=..., combine="sparse" | "dense")`` returns ``MoEOutput`` whatever its flags.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..experts.base import ExpertBank
from ..experts.dispatch import combine_dense, dispatch
from ..routers.base import Router
from ..types import MoEOutput, RoutingDecision
from .checks import check_layer_input, first_tensor

__all__ = ["MoE", "flatten_meta", "check_layer_parts", "run_layer"]

COMBINES = ("sparse", "dense")


def flatten_meta(meta: Mapping[str, Any] | None, lead_shape: torch.Size) -> dict[str, Any] | None:
    """Bring per-example or per-token metadata to one value per token.

    A tensor whose shape is ``lead_shape`` (per token) or a prefix of it (per example) is broadcast
    and flattened to ``[T]``; other values pass through unchanged.
    """
    if meta is None:
        return None
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            n = value.dim()
            if tuple(value.shape) != tuple(lead_shape[:n]):
                raise ValueError(
                    f"meta[{key!r}] has shape {tuple(value.shape)}; expected the input's leading shape "
                    f"{tuple(lead_shape)} or a prefix of it"
                )
            value = value.reshape(*value.shape, *([1] * (len(lead_shape) - n))).expand(*lead_shape).reshape(-1)
        out[key] = value
    return out


class MoE(nn.Module):
    """Mixture-of-Experts layer.

    Args:
        router: any moekit router (its ``dim`` must match the bank's router features).
        experts: an expert bank.
        combine: ``"sparse"`` runs only the chosen experts (sort, grouped matmul, weighted scatter);
            ``"dense"`` runs every expert and mixes with the decision's weights (oracle/ensembles).

    Input ``[..., D]`` (token banks) or ``[N, C, H, W]`` (conv banks, routed per image).
    """

    def __init__(self, router: Router, experts: ExpertBank, *, combine: str = "sparse") -> None:
        super().__init__()
        self.combine = check_layer_parts(router, experts, combine)
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has num_experts={router.num_experts} but experts has num_experts={experts.num_experts}"
            )
        self.router = router
        self.experts = experts

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: Tensor, *, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        return run_layer(self.router, self.experts, self.combine, x, meta)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


def check_layer_parts(router: Router, experts: ExpertBank, combine: str) -> str:
    """Validate a router + bank pair (types, widths, device) and return the checked ``combine``."""
    if not isinstance(router, Router):
        raise TypeError(f"router must be a moekit Router, got {type(router).__name__}")
    if not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be a moekit ExpertBank, got {type(experts).__name__}")
    if router.dim != experts.dim:
        raise ValueError(f"router has dim={router.dim} but experts has dim={experts.dim}")
    _check_same_placement(router, experts)
    return check_choice("combine", combine, COMBINES)


def run_layer(
    router: Router,
    experts: ExpertBank,
    combine: str,
    x: Tensor,
    meta: Mapping[str, Any] | None,
    bank_view: Callable[[RoutingDecision], RoutingDecision] | None = None,
) -> MoEOutput:
    """Route ``x``, run the chosen experts and return the router's own decision with the output.

    ``bank_view`` maps the router's decision to the one the bank runs (e.g. the merged form's index
    map); by default the bank runs the router's decision as it is.
    """
    check_layer_input(x, experts)
    x_T = experts.as_tokens(x)
    lead = x.shape[:-1] if experts.token_input else x.shape[:1]
    decision = router(experts.router_features(x_T), meta=flatten_meta(meta, lead))
    run = decision if bank_view is None else bank_view(decision)
    if combine == "sparse":
        y_T = dispatch(experts, x_T, run)
    else:
        y_T = combine_dense(experts, x_T, run.gates_TE())
    return MoEOutput(y=experts.restore(y_T, x), aux=dict(decision.aux), decision=decision)


def _check_same_placement(router: nn.Module, experts: nn.Module) -> None:
    """Router and experts on one device (their dtypes may differ: router maths runs in fp32)."""
    r, e = first_tensor(router), first_tensor(experts)
    if r is not None and e is not None and r.device != e.device:
        raise ValueError(f"router is on {r.device} but experts are on {e.device}; move the layer with .to(device)")

