"""Router base class: ``forward(x_TD, *, meta=None) -> RoutingDecision``.

Routers never touch expert weights. Router maths runs in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_finite, check_int, check_last_dim
from ..balancing import Balancer
from ..types import RoutingDecision

__all__ = ["Router", "LinearScorer", "Meta", "name_routers"]

Meta = Mapping[str, Any]


class Router(nn.Module):
    """Base class for routers over ``num_experts`` experts for inputs of width ``dim``.

    Subclasses implement ``route``. ``forward`` validates the input, runs ``route``, checks logits
    for NaN/inf (``check_finite``, on by default) and lets an optional balancer observe the
    decision in training mode.

    Class attribute ``is_sparse``: True when each token gets at most ``k`` experts (so only the
    chosen experts need to run); dense routers (softmax, SMEAR) are False.
    """

    is_sparse: bool = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int,
        *,
        balancer: Balancer | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, low=1)
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.k = check_int("k", k, low=1)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got k={k}")
        if balancer is not None and balancer.num_experts != num_experts:
            raise ValueError(
                f"balancer has num_experts={balancer.num_experts}, router has num_experts={num_experts}"
            )
        guarded = getattr(balancer, "k", None)  # a hard constraint never masks more than E - k experts
        if guarded is not None and guarded < k:
            raise ValueError(
                f"balancer {type(balancer).__name__} has k={guarded} but the router picks k={k} experts per "
                f"token, so it could pick masked experts; build the balancer with k={k}"
            )
        self.balancer = balancer
        self.check_finite = check_finite
        self.layer_name = type(self).__name__  # name_routers(model) sets the module path

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        raise NotImplementedError

    def forward(self, x_TD: Tensor, *, meta: Meta | None = None) -> RoutingDecision:
        check_last_dim("x", x_TD, self.dim)
        if x_TD.dim() != 2:
            raise ValueError(f"router input must be [T, dim={self.dim}], got shape {tuple(x_TD.shape)}")
        decision = self.route(x_TD, meta)
        if self.check_finite and decision.logits_TE is not None:
            check_finite(decision.logits_TE, self.layer_name)
        if self.training and self.balancer is not None:
            self.balancer.observe(decision)
        return decision

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        """Logits used to *pick* experts (balancer-adjusted); weights use the raw logits."""
        return logits_TE if self.balancer is None else self.balancer.selection_logits(logits_TE)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"


def name_routers(model: nn.Module) -> nn.Module:
    """Give every moekit router inside ``model`` its module path (e.g. ``blocks.0.router``) as
    ``layer_name``, so that errors such as non-finite logits say which layer failed. Returns ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Router):
            module.layer_name = f"{name} ({type(module).__name__})" if name else type(module).__name__
    return model


class LinearScorer(nn.Module):
    """Bias-free linear map to per-expert logits, computed in fp32: ``[T, D] -> [T, E]``."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        init_std: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=dtype))
        if init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        elif init_std == 0:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=init_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        return x_TD.float() @ self.weight.float().t()
