"""Shared adapter for families with fused 3D GLU experts and a top-k router (transformers 5.x).

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 store a block's experts as ``experts.gate_up_proj [E, 2F, D]`` (gate
rows first, ``gate, up = (x @ W.T).chunk(2)``) and ``experts.down_proj [E, D, F]`` -- exactly
moekit's ``glu`` layout -- and route with ``gate.weight [E, D]`` (no bias):
``gate(x) -> (logits [T, E], weights [T, K], ids [T, K])``. The experts module takes
``(x, ids, weights)``, so remapping ids is all the exact merged form needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...types import RoutingDecision
from .base import MoEFamily, RemappedRouter, moekit_activation

__all__ = ["FusedTopKFamily", "RemappedTopKRouter", "topk_decision"]

FUSED = ("gate_up_proj", "down_proj")


class RemappedTopKRouter(RemappedRouter):
    """``(logits [T, E], weights [T, K], ids [T, K]) -> (logits, weights, expert_map[ids])``."""

    def remap(self, output: Any) -> Any:
        logits, weights, ids = output
        return logits, weights, self.expert_map[ids]


def topk_decision(output: Any, score: str = "softmax") -> RoutingDecision:
    """A top-k router's ``(logits [T, E], weights [T, K], ids [T, K])`` as a ``RoutingDecision``;
    ``probs_TE`` are the router's per-expert scores (``score``: softmax, or sigmoid for DeepSeek-V3-style
    routers)."""
    logits, weights, ids = output
    logits_TE = logits.detach().reshape(-1, logits.shape[-1]).float()
    return RoutingDecision(
        ids_TK=ids.detach().reshape(logits_TE.shape[0], -1).long(),
        weights_TK=weights.detach().reshape(logits_TE.shape[0], -1).float(),
        num_experts=logits_TE.shape[1],
        logits_TE=logits_TE,
        probs_TE=torch.sigmoid(logits_TE) if score == "sigmoid" else torch.softmax(logits_TE, dim=-1),
    )


class FusedTopKFamily(MoEFamily):
    """Base for Mixtral-style families; a subclass sets ``name``, ``model_types``, ``experts_key``
    and ``block_types``."""

    kind = "glu"
    top_k_key = "num_experts_per_tok"
    router_attr = "gate"

    def _experts(self, block: nn.Module) -> nn.Module:
        experts = block.experts
        if not all(isinstance(getattr(experts, n, None), Tensor) for n in FUSED):
            raise ValueError(
                f"{type(experts).__name__} has no fused gate_up_proj/down_proj tensors: moekit reads the "
                "transformers>=5 layout; upgrade transformers"
            )
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            raise ValueError(f"{type(experts).__name__} has a transposed or biased expert layout (not supported)")
        return experts

    def read_experts(self, block: nn.Module) -> dict[str, Tensor]:
        experts = self._experts(block)
        return {n: getattr(experts, n).detach() for n in FUSED}

    def router_linear(self, router: nn.Module) -> nn.Module:
        """The module holding the router's ``weight [E, D]`` (the router itself; HunYuan: ``router.wg``)."""
        return router

    def read_router(self, block: nn.Module) -> tuple[Tensor, Tensor | None]:
        return self.router_linear(self.router(block)).weight.detach(), None

    def activation(self, config: Any) -> str:
        return moekit_activation(config.hidden_act)

    def resize_experts(self, block: nn.Module, num_experts: int) -> None:
        experts = self._experts(block)
        for n in FUSED:
            old = getattr(experts, n)
            setattr(experts, n, nn.Parameter(old.detach()[:num_experts].clone(), requires_grad=old.requires_grad))
        experts.num_experts = num_experts

    def copy_experts(self, block: nn.Module, params: dict[str, Tensor]) -> None:
        experts = self._experts(block)
        for n in FUSED:
            getattr(experts, n).copy_(params[n])

    def write_router(self, block: nn.Module, weight_GD: Tensor, bias_G: Tensor | None) -> None:
        if bias_G is not None:
            raise ValueError(f"{self.name} routers have no bias, got a folded bias")
        router = getattr(block, self.router_attr)
        if isinstance(router, RemappedRouter):
            raise ValueError("cannot write a plain router into an exact-form (remapped) block")
        G = weight_GD.shape[0]
        linear = self.router_linear(router)
        old = linear.weight
        new = weight_GD.detach().to(old.device, old.dtype).clone()
        linear.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        if isinstance(linear, nn.Linear):
            linear.out_features = G
        router.num_experts = G
        router.top_k = min(router.top_k, G)
        for name in ("top_k", "num_experts"):  # blocks that keep their own copies (Phi-MoE, ERNIE)
            if isinstance(getattr(block, name, None), int):
                setattr(block, name, min(getattr(block, name), G))

    def remapped_router(self, router: nn.Module, expert_map: Tensor, num_experts: int) -> RemappedRouter:
        return RemappedTopKRouter(router, expert_map, num_experts)

    def decision(self, output: Any) -> RoutingDecision:
        return topk_decision(output)

    def experts_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``experts(hidden [T, D], top_k_index [T, K], top_k_weights [T, K])`` (positional or keywords)."""
        hidden, ids, weights = [*args, *kwargs.values()][:3]
        x_TD = hidden.reshape(-1, hidden.shape[-1])
        ids_TK = ids.reshape(x_TD.shape[0], -1)
        return x_TD, ids_TK, weights.reshape(ids_TK.shape), None
