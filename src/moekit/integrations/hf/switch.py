"""SwitchTransformers (``model_type="switch_transformers"``): encoder-decoder, top-1 routing, MLP experts.

``SwitchTransformersSparseMLP`` = ``router`` (``classifier: Linear(D, E, bias=config.router_bias)``,
fp32 softmax, top-1 with a per-sequence ``expert_capacity``; returns ``(one_hot [B, S, E] with
overflowing tokens zeroed, max prob [B, S, 1], logits [B, S, E])``) + ``experts``, a ModuleDict of
``expert_{i}`` with ``wi: Linear(D, F)`` and ``wo: Linear(F, D)`` -> moekit ``mlp`` layout
``up_proj [E, F, D]``, ``down_proj [E, D, F]`` (biases when the Linears have them). Sparse layers of
both the encoder and the decoder are MoE blocks. Expert count in ``config.num_experts``.

Plain form: the per-expert ``expert_capacity`` is scaled by E/G (rounded up) so the layer's total
capacity is unchanged. Exact form: the router (and its capacity drops) is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...types import RoutingDecision
from .base import MoEFamily, RemappedRouter, moekit_activation, pretrained_modules, register_family

__all__ = ["SwitchFamily", "RemappedSwitchRouter"]


class RemappedSwitchRouter(RemappedRouter):
    """``(one_hot [B, S, E], probs, logits) -> (one_hot [B, S, G], probs, logits)``."""

    def remap(self, output: Any) -> Any:
        one_hot, probs, logits = output
        merged = one_hot.new_zeros(*one_hot.shape[:-1], self.num_experts)
        return merged.index_add_(-1, self.expert_map, one_hot), probs, logits


@register_family
class SwitchFamily(MoEFamily):
    name = "switch_transformers"
    compressible = False  # a ModuleDict of experts with per-expert capacity: no moekit bank in its place
    model_types = ("switch_transformers",)
    kind = "mlp"
    experts_key = "num_experts"
    top_k_key = None
    router_attr = "router"
    decoder_only = False
    supports_novices = False  # its experts take a one-hot over G and run a ModuleDict: no novice slots

    def block_types(self) -> tuple[type, ...]:
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

        return (SwitchTransformersSparseMLP,)

    @staticmethod
    def _expert(block: nn.Module, e: int) -> nn.Module:
        return block.experts[f"expert_{e}"]

    def read_experts(self, block: nn.Module) -> dict[str, Tensor]:
        experts = [self._expert(block, e) for e in range(self.num_experts(block))]
        params = {
            "up_proj": torch.stack([x.wi.weight.detach() for x in experts]),
            "down_proj": torch.stack([x.wo.weight.detach() for x in experts]),
        }
        if experts[0].wi.bias is not None:
            params["up_bias"] = torch.stack([x.wi.bias.detach() for x in experts])
        if experts[0].wo.bias is not None:
            params["down_bias"] = torch.stack([x.wo.bias.detach() for x in experts])
        return params

    def read_router(self, block: nn.Module) -> tuple[Tensor, Tensor | None]:
        gate = self.router(block).classifier
        return gate.weight.detach(), None if gate.bias is None else gate.bias.detach()

    def activation(self, config: Any) -> str:
        return moekit_activation(config.dense_act_fn)

    def resize_experts(self, block: nn.Module, num_experts: int) -> None:
        for e in range(num_experts, self.num_experts(block)):
            del block.experts[f"expert_{e}"]
        block.experts.num_experts = num_experts

    def copy_experts(self, block: nn.Module, params: dict[str, Tensor]) -> None:
        for e in range(self.num_experts(block)):
            expert = self._expert(block, e)
            expert.wi.weight.copy_(params["up_proj"][e])
            expert.wo.weight.copy_(params["down_proj"][e])
            if expert.wi.bias is not None:
                expert.wi.bias.copy_(params["up_bias"][e])
            if expert.wo.bias is not None:
                expert.wo.bias.copy_(params["down_bias"][e])

    def write_router(self, block: nn.Module, weight_GD: Tensor, bias_G: Tensor | None) -> None:
        router = getattr(block, self.router_attr)
        if isinstance(router, RemappedRouter):
            raise ValueError("cannot write a plain router into an exact-form (remapped) block")
        old = router.classifier
        if (bias_G is None) != (old.bias is None):
            raise ValueError(f"folded router bias is {'missing' if bias_G is None else 'unexpected'} for this router")
        G, D = weight_GD.shape
        new = nn.Linear(D, G, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight_GD)
            if bias_G is not None:
                new.bias.copy_(bias_G)
        router.classifier = new
        router.num_experts = G

    def remapped_router(self, router: nn.Module, expert_map: Tensor, num_experts: int) -> RemappedRouter:
        return RemappedSwitchRouter(router, expert_map, num_experts)

    def decision(self, output: Any) -> RoutingDecision:
        one_hot, probs, logits = output
        E = logits.shape[-1]
        logits_TE = logits.detach().reshape(-1, E).float()
        chosen_TE = one_hot.detach().reshape(-1, E)
        kept_T1 = chosen_TE.sum(-1, keepdim=True) > 0
        ids_T1 = torch.where(kept_T1, chosen_TE.argmax(-1, keepdim=True), logits_TE.argmax(-1, keepdim=True))
        return RoutingDecision(
            ids_TK=ids_T1.long(),
            weights_TK=probs.detach().reshape(-1, 1).float(),
            num_experts=E,
            logits_TE=logits_TE,
            probs_TE=torch.softmax(logits_TE, dim=-1),
            kept_TK=kept_T1,
        )

    def experts_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``experts(hidden [T, D], one_hot [T, 1, G] (dropped tokens all zero), weights [T, 1])``."""
        hidden, one_hot, weights = [*args, *kwargs.values()][:3]
        chosen_TG = one_hot.reshape(hidden.shape[0], -1)
        kept_T1 = chosen_TG.sum(-1, keepdim=True) > 0
        return hidden, chosen_TG.argmax(-1, keepdim=True), weights.reshape(-1, 1), kept_T1

    def set_num_experts(self, model: nn.Module, num_experts: int) -> None:
        before = int(model.config.num_experts)
        capacity = math.ceil(model.config.expert_capacity * before / num_experts)
        super().set_num_experts(model, num_experts)
        for module in pretrained_modules(model):
            module.config.expert_capacity = capacity
        for block in self.blocks(model).values():
            self.router(block).expert_capacity = capacity

    def write_compressed(self, block: nn.Module, bank: nn.Module, config: Any) -> nn.Module:
        raise ValueError(
            "switch_transformers: compressed experts (--rank) are not supported (its block runs a ModuleDict of "
            "experts with per-expert capacity, which a moekit bank does not replace); merge or prune only"
        )

    def forward_tokens(self, model: nn.Module, batch: Any) -> Any:
        """Encoder input = the ids; decoder input = ``decoder_input_ids`` when the batch has them, else the
        ids shifted right (as for ``labels``). ``batch``: ids ``[B, S]`` or a dict of token-id tensors."""
        if isinstance(batch, Tensor):
            return model(input_ids=batch, labels=batch)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "decoder_input_ids")}
        if "decoder_input_ids" not in inputs:
            inputs["labels"] = inputs["input_ids"]
        return model(**inputs)
