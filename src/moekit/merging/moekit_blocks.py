"""The block adapter for moekit's own MoE layers (``MoE``, ``RemappedMoE``).

Reads a layer with an ``mlp``/``glu`` bank and a linear-gate router (top-k, Switch) into
``ExpertLayerWeights`` and builds the reduced layer: ``RemappedMoE`` (exact form: router
unchanged, index map) or a smaller ``MoE`` with the folded router (plain form). A compressed bank
replaces the layer's bank. Layers are observed through their router's output (a ``RoutingDecision``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from .._checks import check_choice
from ..experts.mlp import GLUExperts, MLPExperts
from ..layers.moe import MoE, is_token_moe
from ..layers.remap import RemappedMoE
from ..routers.topk import TopKRouter
from .adapter import FORMS, BlockAdapter
from .observer import BlockCall
from .weights import BankWeights, ExpertLayerWeights, LayerMergeResult, RoutingSpec

__all__ = ["MoekitBlocks", "MOEKIT_BLOCKS", "moe_layers", "read_moe_layer", "build_merged_layer"]


def read_moe_layer(moe: nn.Module) -> ExpertLayerWeights:
    """A moekit ``MoE`` with an ``mlp``/``glu`` bank and a linear-gate router (top-k, Switch) as
    ``ExpertLayerWeights``."""
    if isinstance(moe, RemappedMoE):
        raise ValueError("this layer is already merged (RemappedMoE); merge the original model instead")
    if not is_token_moe(moe):
        raise TypeError(f"expected a per-token moekit MoE layer, got {type(moe).__name__}")
    if not isinstance(moe.router, TopKRouter):
        raise ValueError(f"merging needs a linear-gate router (topk, switch), got {type(moe.router).__name__}")
    bank = moe.experts
    if isinstance(bank, GLUExperts):
        kind = "glu"
    elif isinstance(bank, MLPExperts):
        kind = "mlp"
    else:
        raise ValueError(f"merging supports 'mlp' and 'glu' expert banks, got {type(bank).__name__}")
    params = {name: p.detach() for name, p in bank.stacked_parameters().items()}
    return ExpertLayerWeights(kind, params, moe.router.gate.weight.detach(), None, bank.activation)


def _bank(bank: nn.Module, result: LayerMergeResult) -> nn.Module:
    new = copy.deepcopy(bank)
    for name, tensor in result.weights.params.items():
        setattr(new, name, nn.Parameter(tensor.clone().to(getattr(bank, name).device)))
    new.num_experts = int(result.dominant.shape[0])
    return new


def build_merged_layer(moe: MoE, result: LayerMergeResult, form: str) -> nn.Module:
    """The merged layer: ``RemappedMoE`` (exact) or a ``MoE`` with a folded router (plain)."""
    check_choice("form", form, FORMS)
    bank = _bank(moe.experts, result)
    G = bank.num_experts
    if form == "exact":
        router = copy.deepcopy(moe.router)
        return RemappedMoE(router, bank, result.expert_map.to(bank.down_proj.device), combine=moe.combine)
    if moe.router.balancer is not None:
        raise ValueError("form='plain' cannot fold a router with a balancer; use form='exact'")
    router = copy.deepcopy(moe.router)
    gate = result.weights.router_weight.to(moe.router.gate.weight)
    router.gate.weight = nn.Parameter(gate.clone())
    if router.noise is not None:  # training-time noise scales: mean over each group's rows
        mix = torch.zeros(G, moe.router.num_experts, dtype=gate.dtype, device=gate.device)
        mix[result.expert_map.to(gate.device), torch.arange(moe.router.num_experts, device=gate.device)] = 1.0
        router.noise.weight = nn.Parameter((mix / mix.sum(1, keepdim=True)) @ moe.router.noise.weight.detach())
    router.num_experts, router.k = G, min(router.k, G)
    return MoE(router, bank, combine=moe.combine)


class MoekitBlocks(BlockAdapter):
    """moekit ``MoE`` / ``RemappedMoE`` layers anywhere in a module."""

    name = "moekit"

    def blocks(self, module: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in module.named_modules() if is_token_moe(m)}

    def num_experts(self, block: nn.Module) -> int:
        return int(block.experts.num_experts)

    def router_outputs(self, block: nn.Module) -> int:
        return int(block.router.num_experts)

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(score="softmax", top_k=int(block.router.k))

    def read(self, block: nn.Module, config: Any) -> ExpertLayerWeights:
        return read_moe_layer(block)

    def read_bank(self, block: nn.Module, config: Any) -> BankWeights:
        bank = block.experts
        if not isinstance(bank, (GLUExperts, MLPExperts)):
            raise ValueError(f"low-rank compression needs an 'mlp' or 'glu' bank, got {type(bank).__name__}")
        kind = "glu" if isinstance(bank, GLUExperts) else "mlp"
        return BankWeights(kind, {n: p.detach() for n, p in bank.stacked_parameters().items()}, bank.activation)

    def write(self, block: nn.Module, result: LayerMergeResult, form: str, config: Any) -> nn.Module:
        return build_merged_layer(block, result, form)

    def write_compressed(self, block: nn.Module, bank: nn.Module, config: Any) -> nn.Module:
        if isinstance(block, RemappedMoE):
            return RemappedMoE(block.router, bank, block.expert_map, combine=block.combine)
        return MoE(block.router, bank, combine=block.combine)

    def observe(self, block: nn.Module, config: Any, sink: Callable[[BlockCall], None]) -> list[Any]:
        routing = self.routing(block, config)
        expert_map = getattr(block, "expert_map", None)
        G = self.num_experts(block)

        def hook(module: nn.Module, args: tuple[Any, ...], decision: Any) -> None:
            x = args[0].detach()
            ids = decision.ids_TK.detach()
            sink(BlockCall(
                x_TD=x.reshape(-1, x.shape[-1]), ids_TK=ids if expert_map is None else expert_map[ids],
                weights_TK=decision.weights_TK.detach(), kept_TK=decision.kept_TK,
                logits_TE=None if decision.logits_TE is None else decision.logits_TE.detach().float(),
                routing=routing, num_experts=G, router_ids_TK=ids,
            ))  # fmt: skip

        return [block.router.register_forward_hook(hook)]


#: the adapter instance for moekit layers
MOEKIT_BLOCKS = MoekitBlocks()


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every moekit ``MoE`` / ``RemappedMoE`` in ``model`` by module name."""
    return MOEKIT_BLOCKS.blocks(model)
