"""A small MoE classifier for vector inputs: embed -> residual MoE block(s) -> linear head."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..layers.moe import MoE
from ..registry import EXPERTS, MODELS, ROUTERS
from ..routers.base import name_routers
from ..types import MoEOutput

__all__ = ["MoEClassifier"]


@MODELS.register("moe_classifier", summary="vector classifier with residual MoE blocks")
class MoEClassifier(nn.Module):
    """``Linear(in, D) -> GELU -> [x + MoE(LayerNorm(x))] x depth -> Linear(D, classes)``.

    ``forward(x, meta=None)`` returns ``(logits [B, classes], [MoEOutput per block])``.
    Router and expert bank are chosen by registry name with their keyword arguments; ``balancer`` (a
    ``moekit.balancing.BALANCERS`` name, e.g. ``"aux_free"``) gives every router its own balancer
    built with ``balancer_kwargs``. ``config()`` returns the keyword arguments (for checkpoints).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 1,
        num_experts: int = 8,
        router: str = "topk",
        router_kwargs: Mapping[str, Any] | None = None,
        experts: str = "mlp",
        expert_kwargs: Mapping[str, Any] | None = None,
        balancer: str | None = None,
        balancer_kwargs: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        check_int("depth", depth, low=1)
        self._config = {
            "in_dim": in_dim, "num_classes": num_classes, "dim": dim, "depth": depth, "num_experts": num_experts,
            "router": router, "router_kwargs": dict(router_kwargs or {}), "experts": experts,
            "expert_kwargs": dict(expert_kwargs or {}), "balancer": balancer,
            "balancer_kwargs": dict(balancer_kwargs or {}),
        }  # fmt: skip
        self.embed = nn.Linear(check_int("in_dim", in_dim, low=1), dim, **kw)
        self.norms = nn.ModuleList(nn.LayerNorm(dim, **kw) for _ in range(depth))
        expert_kwargs = {"hidden": 2 * dim, **(expert_kwargs or {})}
        self.blocks = nn.ModuleList(
            MoE(
                ROUTERS.create(router, dim=dim, num_experts=num_experts, **self._router_kwargs(**kw), **kw),
                EXPERTS.create(experts, num_experts=num_experts, dim=dim, **expert_kwargs, **kw),
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, check_int("num_classes", num_classes, low=2), **kw)
        name_routers(self)  # errors name the block, e.g. "blocks.0.router (TopKRouter)"

    def _router_kwargs(self, **kw: Any) -> dict[str, Any]:
        """One router's keyword arguments, with a fresh balancer when ``balancer`` is set."""
        out = dict(self._config["router_kwargs"])
        if self._config["balancer"] is not None:
            from ..balancing import create_balancer

            k = int(out.get("k", 1))
            out["balancer"] = create_balancer(
                self._config["balancer"], self._config["num_experts"], k=k, **self._config["balancer_kwargs"]
            ).to(kw["device"])
        return out

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this model (ValueError when router_kwargs hold objects)."""
        import json

        try:
            json.dumps(self._config)
        except TypeError:
            raise ValueError(
                "router_kwargs or expert_kwargs hold Python objects (e.g. a balancer instance), which a "
                "checkpoint config cannot describe; pass them by name (balancer='aux_free', balancer_kwargs=...)"
            ) from None
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._config.items()}

    def forward(self, x: Tensor, meta: Mapping[str, Any] | None = None) -> tuple[Tensor, list[MoEOutput]]:
        h = torch.nn.functional.gelu(self.embed(x))
        outputs = []
        for norm, block in zip(self.norms, self.blocks):
            out = block(norm(h), meta=meta)
            h = h + out.y
            outputs.append(out)
        return self.head(h), outputs
