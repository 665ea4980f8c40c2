"""Family adapters: the block-adapter protocol (``moekit.merging.adapter``) for Hugging Face MoE families.

One ``MoEFamily`` subclass per model family (one small file: ``mixtral.py``, ``qwen2_moe.py``,
``deepseek_v3.py``, ``gpt_oss.py``, ...), registered by ``config.model_type`` with ``@register_family``.
An adapter knows, in the tensor layout of the installed transformers 5.x:

* where the MoE blocks are (``block_types``), which child is the router (``router_attr``) and which
  the experts (``experts_attr``); everything else in a block (shared experts and their gates) is
  never touched (``shared_tensors``);
* how to read a block into moekit's hand-off format ``ExpertLayerWeights`` (nn.Linear layout
  ``[E, out, in]``: ``glu`` = ``gate_up_proj [E, 2F, D]`` gate rows first + ``down_proj [E, D, F]``;
  ``mlp`` = ``up_proj [E, F, D]`` + ``down_proj [E, D, F]`` + optional biases) and write G experts back;
* how the router routes (``routing``: score function, top-k, routing biases, group-limited routing);
* how to read its router's output (``decision``, for ``RoutingRecorder``) and the routing its
  experts module receives (``experts_call``, for the observer);
* which config fields hold the expert count and experts-per-token (for the plain form).

The exact merged form wraps a block's router in a ``RemappedRouter`` (router unchanged, E outputs,
decisions mapped to G experts); adapters say how to map their router's output.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ...merging.adapter import FORMS, BlockAdapter
from ...merging.observer import BlockCall
from ...merging.weights import BankWeights, ExpertLayerWeights, LayerMergeResult, RoutingSpec
from ...types import RoutingDecision
from .compressed import CompressedExperts
from .novice import has_novices, with_novices

__all__ = [
    "MoEFamily",
    "RemappedRouter",
    "FAMILIES",
    "register_family",
    "family_for",
    "list_families",
    "moekit_activation",
    "pretrained_modules",
]

#: Hugging Face ``hidden_act`` names -> moekit activation names (``moekit.experts.base.ACTIVATIONS``)
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def moekit_activation(hf_name: str) -> str:
    """moekit's name for a Hugging Face activation (unknown names pass through unchanged; only
    expert-output statistics need the activation, and they then report the unknown name)."""
    return HF_ACTIVATIONS.get(hf_name, hf_name)


class RemappedRouter(nn.Module):
    """The exact merged form of a Hugging Face MoE block's router.

    Wraps the original router (``router``, E outputs, unchanged) and maps each of its decisions
    through ``expert_map [E]`` to one of G merged experts (M-SMoE's "redirect",
    https://arxiv.org/abs/2310.01334, App. A3). Tokens whose chosen experts share a merged expert
    run it once per slot, so their gates add up. ``num_experts`` is G (what the block's experts see;
    G + N with N MoNE novices, ``novice.py``); ``router_outputs`` is E. Subclasses implement ``remap``
    for their router's output format.
    """

    def __init__(self, router: nn.Module, expert_map: Tensor, num_experts: int) -> None:
        super().__init__()
        if isinstance(router, RemappedRouter):
            raise ValueError("this router is already remapped (exact merged form); merge the original model instead")
        expert_map = torch.as_tensor(expert_map, dtype=torch.long)
        bad = expert_map.dim() != 1 or (  # values unknown on the meta device (loader before weights)
            expert_map.device.type != "meta" and bool(((expert_map < 0) | (expert_map >= num_experts)).any())
        )
        if bad:
            raise ValueError(f"expert_map must be [E] ids in [0, {num_experts}), got {expert_map.tolist()}")
        self.router = router
        self.num_experts = int(num_experts)
        self.router_outputs = int(expert_map.shape[0])
        device = next(router.parameters()).device
        self.register_buffer("expert_map", expert_map.to(device))

    @abc.abstractmethod
    def remap(self, output: Any) -> Any:
        """The router's output with expert ids mapped to merged experts."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.remap(self.router(*args, **kwargs))

    def extra_repr(self) -> str:
        return f"router_outputs={self.router_outputs}, experts={self.num_experts}"


class MoEFamily(BlockAdapter):
    """Adapter for one Hugging Face MoE family (stateless; one instance per registered family).

    Class attributes: ``name``; ``model_types`` (``config.model_type`` values); ``kind``
    (``"glu"``/``"mlp"``); ``experts_key`` / ``top_k_key``: config fields with the expert count and
    the experts per token (``None`` for top-1 families); ``router_attr`` / ``experts_attr``: the
    block's router and experts children; ``decoder_only``: the model runs layer by layer (streaming).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    kind: ClassVar[str]
    experts_key: ClassVar[str]
    top_k_key: ClassVar[str | None] = None
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    decoder_only: ClassVar[bool] = True
    #: the exact form can hold MoNE novices (``novice.py``): the experts module takes ``(x, ids, gates)``
    supports_novices: ClassVar[bool] = True

    # ----- structure
    @abc.abstractmethod
    def block_types(self) -> tuple[type, ...]:
        """The classes of this family's sparse MoE blocks."""

    def blocks(self, module: nn.Module) -> dict[str, nn.Module]:
        types = self.block_types()
        return {name: m for name, m in module.named_modules() if isinstance(m, types)}

    def router(self, block: nn.Module) -> nn.Module:
        """The block's original router (inside the ``RemappedRouter`` for exact-form blocks)."""
        router = getattr(block, self.router_attr)
        return router.router if isinstance(router, RemappedRouter) else router

    def is_remapped(self, block: nn.Module) -> bool:
        return isinstance(getattr(block, self.router_attr), RemappedRouter)

    def num_experts(self, block: nn.Module) -> int:
        return int(getattr(block, self.experts_attr).num_experts)

    def router_outputs(self, block: nn.Module) -> int:
        return int(self.router(block).num_experts)

    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        """Default: softmax over all E logits, ``top_k`` from the config, a router bias if any."""
        _, bias = self.read_router(block)
        return RoutingSpec(score="softmax", top_k=self.top_k(config), selection_bias=None if bias is None else "router_bias")

    def shared_tensors(self, block: nn.Module) -> tuple[str, ...]:
        """Every tensor of the block outside its router and routed experts (shared experts, their gates)."""
        own = (f"{self.router_attr}.", f"{self.experts_attr}.")
        return tuple(n for n, _ in block.state_dict().items() if not n.startswith(own))

    # ----- tensors
    @abc.abstractmethod
    def read_experts(self, block: nn.Module) -> dict[str, Tensor]:
        """The block's expert tensors in moekit layout, each ``[E, ...]`` (detached; may share storage)."""

    @abc.abstractmethod
    def read_router(self, block: nn.Module) -> tuple[Tensor, Tensor | None]:
        """The original router's ``(weight [E, D], bias [E] or None)`` (detached)."""

    def read_router_extras(self, block: nn.Module) -> dict[str, Tensor]:
        """Other per-expert router tensors that follow the router rows (e.g. ``e_score_correction_bias``)."""
        return {}

    @abc.abstractmethod
    def activation(self, config: Any) -> str:
        """moekit name of the experts' activation."""

    def activation_params(self, config: Any) -> dict[str, float]:
        """Constants of the activation (GPT-OSS's clamp limit and alpha)."""
        return {}

    def read(self, block: nn.Module, config: Any) -> ExpertLayerWeights:
        if self.is_remapped(block):
            raise ValueError("this block is in the exact merged form (E router outputs, G experts); use the original")
        weight, bias = self.read_router(block)
        return ExpertLayerWeights(
            self.kind, self.read_experts(block), weight, bias, self.activation(config), self.activation_params(config),
            self.read_router_extras(block),
        )  # fmt: skip

    def read_bank(self, block: nn.Module, config: Any) -> BankWeights:
        experts = getattr(block, self.experts_attr)
        if isinstance(experts, CompressedExperts):
            raise ValueError("this block's experts are already compressed (low-rank + sparse); use the original model")
        if has_novices(experts):
            raise ValueError("this block holds MoNE novices beside its experts; the low-rank step (--rank) is not "
                             "offered after method 'mone'")  # fmt: skip
        return BankWeights(self.kind, self.read_experts(block), self.activation(config))

    def write_compressed(self, block: nn.Module, bank: nn.Module, config: Any) -> nn.Module:
        """The block's experts module replaced by ``CompressedExperts(bank)`` (same call signature)."""
        setattr(block, self.experts_attr, CompressedExperts(bank))
        return block

    def read_layer(self, block: nn.Module, config: Any) -> ExpertLayerWeights:
        """``read`` (kept name)."""
        return self.read(block, config)

    @abc.abstractmethod
    def resize_experts(self, block: nn.Module, num_experts: int) -> None:
        """Keep the first ``num_experts`` experts of the bank (shapes only; used before writing and by
        the exact-form loader, where tensors may live on the meta device)."""

    @abc.abstractmethod
    def copy_experts(self, block: nn.Module, params: dict[str, Tensor]) -> None:
        """Copy moekit-layout tensors ``[G, ...]`` into a bank that already has G experts."""

    def write_experts(self, block: nn.Module, params: dict[str, Tensor]) -> None:
        """Replace the bank by the G experts in ``params`` (moekit layout; G <= the current count)."""
        G = int(next(iter(params.values())).shape[0])
        self.resize_experts(block, G)
        with torch.no_grad():
            self.copy_experts(block, params)

    @abc.abstractmethod
    def write_router(self, block: nn.Module, weight_GD: Tensor, bias_G: Tensor | None) -> None:
        """Replace the router by one with G outputs (plain form)."""

    def write_router_extras(self, block: nn.Module, extras: dict[str, Tensor]) -> None:
        """Write the per-expert router tensors of ``read_router_extras`` (plain form, G rows)."""

    @abc.abstractmethod
    def remapped_router(self, router: nn.Module, expert_map: Tensor, num_experts: int) -> RemappedRouter:
        """This family's ``RemappedRouter`` around ``router``."""

    def wrap_router(self, block: nn.Module, expert_map: Tensor, num_experts: int) -> None:
        """Exact form: keep the router, map its decisions through ``expert_map`` to ``num_experts``."""
        router = getattr(block, self.router_attr)
        setattr(block, self.router_attr, self.remapped_router(router, expert_map, num_experts))

    def write(self, block: nn.Module, result: LayerMergeResult, form: str, config: Any) -> nn.Module:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        G = int(result.dominant.shape[0])
        novices = result.novices is not None and result.novice_mask is not None
        if novices and (form != "exact" or not self.supports_novices):
            raise ValueError(f"{self.name}: MoNE novices need form='exact' on a family that can hold them, got "
                             f"form={form!r} (supports_novices={self.supports_novices})")  # fmt: skip
        self.write_experts(block, result.weights.params)
        if form == "plain":
            self.write_router(block, result.weights.router_weight, result.weights.router_bias)
            self.write_router_extras(block, dict(result.weights.router_extras))
        elif novices:  # MoNE: the pruned router outputs go to novice slots G .. G+N-1
            mask = result.novice_mask.cpu()
            N = int(mask.sum())
            expert_map = result.expert_map.clone()
            expert_map[mask] = G + torch.arange(N)
            self.wrap_router(block, expert_map, G + N)
            experts = getattr(block, self.experts_attr)
            like = next(experts.parameters())
            with_novices(experts, result.novices[mask].to(like.device, like.dtype))
        else:
            self.wrap_router(block, result.expert_map, G)
        return block

    def add_novices(self, block: nn.Module, router_ids: list[int], config: Any) -> None:
        """Loader: an exact-form block (G experts, E router outputs) whose router outputs ``router_ids``
        are novices (slots ``G + j``); tensors are left empty for the checkpoint to fill."""
        experts = getattr(block, self.experts_attr)
        like = next(experts.parameters())
        G, N = self.num_experts(block), len(router_ids)
        self.wrap_router(block, torch.zeros(self.router_outputs(block), dtype=torch.long), G + N)
        D = int(config.get_text_config().hidden_size)
        with_novices(experts, torch.zeros(N, D, dtype=like.dtype, device=like.device))

    # ----- routing and observation
    @abc.abstractmethod
    def decision(self, output: Any) -> RoutingDecision:
        """The router's forward output as a ``RoutingDecision`` over its E outputs."""

    @abc.abstractmethod
    def experts_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The experts module's call arguments as ``(x [T, D], ids [T, K], weights [T, K], kept [T, K] or None)``."""

    def observe(self, block: nn.Module, config: Any, sink: Callable[[BlockCall], None]) -> list[Any]:
        routing = self.routing(block, config)
        G = self.num_experts(block)
        seen: dict[str, RoutingDecision] = {}

        def on_router(module: nn.Module, args: Any, output: Any) -> None:
            seen["decision"] = self.decision(output)

        def on_experts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, ids, weights, kept = self.experts_call(args, kwargs)
            decision = seen.pop("decision", None)
            sink(BlockCall(
                x_TD=x.detach(), ids_TK=ids.detach().long(), weights_TK=weights.detach(), kept_TK=kept,
                logits_TE=None if decision is None else decision.logits_TE, routing=routing, num_experts=G,
                router_ids_TK=None if decision is None else decision.ids_TK,
            ))  # fmt: skip

        experts = getattr(block, self.experts_attr)
        return [
            self.router(block).register_forward_hook(on_router),
            experts.register_forward_pre_hook(on_experts, with_kwargs=True),
        ]

    # ----- config
    def top_k(self, config: Any) -> int:
        return 1 if self.top_k_key is None else int(getattr(config, self.top_k_key))

    def set_num_experts(self, model: nn.Module, num_experts: int) -> None:
        """Plain form: every MoE block now has ``num_experts`` experts. Updates the config of the model
        and of its sub-models (encoder-decoder stacks keep their own copies), and the models' own
        ``num_experts`` / ``num_experts_per_tok`` (used by their auxiliary load-balancing loss)."""
        k = min(self.top_k(model.config), num_experts)
        for module in pretrained_modules(model):
            setattr(module.config, self.experts_key, num_experts)
            if self.top_k_key is not None:
                setattr(module.config, self.top_k_key, k)
            if isinstance(getattr(module, "num_experts", None), int):
                module.num_experts = num_experts
            if isinstance(getattr(module, "num_experts_per_tok", None), int):
                module.num_experts_per_tok = k

    # ----- calibration
    def forward_tokens(self, model: nn.Module, ids_BS: Tensor) -> Any:
        """Run the model on token ids ``[B, S]`` so that every MoE block sees them (calibration)."""
        return model(input_ids=ids_BS)


def pretrained_modules(model: nn.Module) -> list[nn.Module]:
    """``model`` and every transformers ``PreTrainedModel`` inside it (each has a ``config``)."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


FAMILIES: dict[str, MoEFamily] = {}


def register_family(cls: type[MoEFamily]) -> type[MoEFamily]:
    """Class decorator: register an adapter for each of its ``model_types``."""
    instance = cls()
    for model_type in cls.model_types:
        if model_type in FAMILIES and type(FAMILIES[model_type]) is not cls:
            raise ValueError(f"model_type {model_type!r} is already handled by {type(FAMILIES[model_type]).__name__}")
        FAMILIES[model_type] = instance
    return cls


def list_families() -> list[str]:
    """Supported ``config.model_type`` values."""
    return sorted(FAMILIES)


def family_for(model_or_config: Any) -> MoEFamily:
    """The adapter for a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unknown MoE model family model_type={model_type!r}; supported: {', '.join(list_families())}"
        )
    return FAMILIES[model_type]
