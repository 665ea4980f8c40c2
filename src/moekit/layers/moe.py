"""The MoE layer: the one forward every moekit MoE runs.

``x -> features -> [gate, router_norm] -> router -> RoutingDecision -> [expert_map] -> dispatcher(bank)
-> [+ shortcut] -> MoEOutput``. What differs between the layers of the papers is a choice of parts:

* *features* (``features.py``): per token (``TokenFeatures``, also per image for image banks), per
  example via masked mean or per causal segment (``ExampleFeatures``);
* *gate*: a module from the bank's rows to the router's input (GAP / conv gate of MoE in CNNs);
  *router_norm*: a LayerNorm on the pooled routing input (the per-example baselines of SMEAR);
* *expert_map*: the exact merged form's index map from router outputs to the bank's experts (M-SMoE);
* *dispatcher* (``dispatchers.py``): local sparse, dense mix, SMEAR merge, all-to-all expert parallel;
* *shortcut*: a module added to the mixture (the residual path of ResBlock-MoE).

``MoE(router=..., experts=..., combine="sparse" | "dense")`` is the plain per-token layer; ``ImageMoE``,
``ResBlockMoE``, ``ConvMoE``, ``ExampleRoutedMoE``, ``SMEAR``, ``OutputEnsemble``, ``RemappedMoE``,
``ExpertParallelMoE`` and ``MultiGateMoE`` are small builders of this class. It returns ``MoEOutput``
whatever its parts. Input, device and dtype checks run here, once, for all of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..experts.base import ExpertBank
from ..routers.base import Router
from ..types import MoEOutput, RoutingDecision
from .checks import check_layer_input, first_tensor
from .dispatchers import DenseMix, Dispatcher, SparseDispatch, dispatcher_for, stop_gradient_rows
from .features import Features, TokenFeatures, flatten_meta

__all__ = ["MoE", "flatten_meta", "check_layer_parts", "remap_decision", "is_token_moe"]

COMBINES = ("sparse", "dense")


def remap_decision(decision: RoutingDecision, expert_map_E: Tensor, num_experts: int) -> RoutingDecision:
    """The decision as the bank sees it: ids mapped through ``expert_map_E``, weights unchanged.

    Per-expert fields over the router's outputs (logits, probabilities, load probabilities) do not
    describe the bank's experts and are dropped.
    """
    return replace(
        decision,
        ids_TK=expert_map_E[decision.ids_TK],
        num_experts=num_experts,
        logits_TE=None,
        probs_TE=None,
        load_prob_TE=None,
    )


class MoE(nn.Module):
    """Mixture-of-Experts layer.

    Args:
        router: any moekit router (its ``dim`` must match the router input: the gate's ``out_dim``, else
            the bank's ``dim``). ``None`` only for layers routed per call (``forward_with``: the gates of
            a multi-gate model).
        experts: an expert bank.
        combine: ``"sparse"`` runs only the chosen experts (sort, grouped matmul, weighted scatter);
            ``"dense"`` runs every expert and mixes with the decision's weights (oracle/ensembles); or a
            ``Dispatcher`` object (SMEAR's merge, expert parallelism).
        features: how the input becomes routing groups (default ``TokenFeatures()``).
        gate: optional module from the bank's rows to the router input (``[N, C, H, W] -> [N, D]``).
        router_norm: optional module (LayerNorm) applied to the routing input before the router.
        shortcut: optional module of the bank's rows added to the mixture.
        expert_map: ``[router.num_experts]`` int64 values in ``[0, experts.num_experts)``: router output e
            runs expert ``expert_map[e]`` (stored as a buffer, saved in checkpoints).

    Input ``[..., D]`` (token banks) or ``[N, C, H, W]`` (conv banks, routed per image); per-example
    features also take a padding ``mask [B, S]``. ``meta`` holds per-token or per-example values.
    """

    #: the names ``combine`` accepts on this class
    combines: tuple[str, ...] = COMBINES

    def __init__(
        self,
        router: Router | None,
        experts: ExpertBank,
        *,
        combine: str | Dispatcher = "sparse",
        features: Features | None = None,
        gate: nn.Module | None = None,
        router_norm: nn.Module | None = None,
        shortcut: nn.Module | None = None,
        expert_map: Tensor | None = None,
    ) -> None:
        super().__init__()
        features = TokenFeatures() if features is None else features
        dispatcher = dispatcher_for(combine, self.combines)
        check_layer_parts(router, experts, gate=gate)
        features.check(experts, gate)
        if router is not None and expert_map is not None:
            _check_map(router, experts, expert_map)
        elif router is not None:
            dispatcher.check(router, experts)
        self.features = features
        if gate is not None:
            self.gate = gate
        self.router = router
        self.experts = experts
        self.router_norm = router_norm
        self.shortcut = shortcut
        self.dispatcher = dispatcher
        if expert_map is None:
            self.expert_map: Tensor | None = None
        else:
            self.register_buffer("expert_map", _as_map(expert_map).to(first_tensor(experts).device))
        if gate is None:
            self.gate = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def combine(self) -> str:
        """The dispatcher's name (``"sparse"``, ``"dense"``, ``"merge"``, ``"all_to_all"``)."""
        return self.dispatcher.name

    @combine.setter
    def combine(self, value: str | Dispatcher) -> None:
        self.dispatcher = dispatcher_for(value, self.combines)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        if self.router is None:
            raise TypeError(f"{type(self).__name__} has no router of its own; call forward_with(router, x)")
        return self.forward_with(self.router, x, mask=mask, meta=meta)

    def forward_with(self, router: Router, x: Tensor, *, mask: Tensor | None = None,
                     meta: Mapping[str, Any] | None = None) -> MoEOutput:
        """The one forward, with ``router`` deciding (the layer's own, or one gate of a multi-gate model)."""
        check_layer_input(x, self.experts)
        routed = self.features(x, mask, meta, self.experts, self.gate)
        route_in = routed.route_in_GD if self.router_norm is None else self.router_norm(routed.route_in_GD)
        decision = router(route_in, meta=routed.meta)
        if routed.stop_grad_G is not None:
            decision = stop_gradient_rows(decision, routed.stop_grad_G)
        run = decision if self.expert_map is None else remap_decision(decision, self.expert_map, self.num_experts)
        y_N = self.dispatcher(self.experts, routed.x_N, run, routed.sizes_G)
        if self.shortcut is not None:
            y_N = y_N + self.shortcut(routed.x_N)
        return MoEOutput(y=routed.restore(y_N), aux=dict(decision.aux), decision=decision)

    def extra_repr(self) -> str:
        parts = [f"combine={self.combine!r}"]
        if not isinstance(self.features, TokenFeatures):
            parts.append(f"features={self.features!r}")
        if self.expert_map is not None and self.router is not None:
            parts.insert(0, f"router_outputs={self.router.num_experts}, experts={self.experts.num_experts}")
        return ", ".join(parts)


def is_token_moe(module: nn.Module) -> bool:
    """A per-token MoE that the merging pipeline reduces: ``MoE`` / ``RemappedMoE`` with its own router,
    token features, no gate or shortcut, and a local sparse or dense dispatcher (not SMEAR, the
    per-example layers, CNN blocks, expert-parallel shards or multi-gate models)."""
    return (
        isinstance(module, MoE)
        and module.router is not None
        and type(module.features) is TokenFeatures
        and module.gate is None
        and module.router_norm is None
        and module.shortcut is None
        and type(module.dispatcher) in (SparseDispatch, DenseMix)
    )


def check_layer_parts(router: Router | None, experts: ExpertBank, combine: str | None = None, *,
                      gate: nn.Module | None = None) -> str | None:
    """Validate a router + bank pair (types, widths, device); returns the checked ``combine`` if given."""
    if router is not None and not isinstance(router, Router):
        raise TypeError(f"router must be a moekit Router, got {type(router).__name__}")
    if not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be a moekit ExpertBank, got {type(experts).__name__}")
    if router is not None:
        if gate is not None and not isinstance(getattr(gate, "out_dim", None), int):
            raise TypeError(f"gate must have an int out_dim (the router's input width), got {type(gate).__name__}")
        width, what = (experts.dim, "experts has dim") if gate is None else (gate.out_dim, "gate gives out_dim")
        if router.dim != width:
            raise ValueError(f"router has dim={router.dim} but {what}={width}")
        _check_same_placement(router, experts)
    return None if combine is None else dispatcher_for(combine).name


def _as_map(expert_map: Tensor) -> Tensor:
    return torch.as_tensor(expert_map, dtype=torch.long, device="cpu")  # checked on CPU, even under a meta device


def _check_map(router: Router, experts: ExpertBank, expert_map: Tensor) -> None:
    """``expert_map`` sends each of the router's E outputs to one of the bank's G experts."""
    E, G, m = router.num_experts, experts.num_experts, _as_map(expert_map)
    if m.shape != (E,) or (m < 0).any() or (m >= G).any():
        raise ValueError(f"expert_map must be [router.num_experts={E}] with values in [0, {G}), got {m.tolist()}")


def _check_same_placement(router: nn.Module, experts: nn.Module) -> None:
    """Router and experts on one device (their dtypes may differ: router maths runs in fp32)."""
    r, e = first_tensor(router), first_tensor(experts)
    if r is not None and e is not None and r.device != e.device:
        raise ValueError(f"router is on {r.device} but experts are on {e.device}; move the layer with .to(device)")
