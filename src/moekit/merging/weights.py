"""The hand-off format between model families and the compression algorithms.

A block adapter (moekit's own layers, Hugging Face Mixtral/Qwen/OLMoE/DeepSeek/GPT-OSS/Switch, ...)
reads one MoE block into ``ExpertLayerWeights``; merging returns a ``LayerMergeResult``; the adapter
writes it back. Expert tensors use moekit's bank layout (nn.Linear ``[E, out, in]``):

  kind "mlp": ``up_proj [E, F, D]``, ``down_proj [E, D, F]``, optional ``up_bias [E, F]``, ``down_bias [E, D]``
  kind "glu": ``gate_up_proj [E, 2F, D]`` (gate rows first), ``down_proj [E, D, F]``, optional
              ``up_bias [E, 2F]`` (gate then up, as the rows) and ``down_bias [E, D]`` (GPT-OSS)

``RoutingSpec`` describes how the block's router turns logits into choices (score function, top-k,
routing biases, group-limited routing, scaling): what merging and pruning must preserve.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
from torch import Tensor

from .._checks import check_choice
from ..experts.base import activation_fn

__all__ = ["ExpertLayerWeights", "BankWeights", "LayerMergeResult", "RoutingSpec", "EXPERT_KINDS", "SCORES", "glu_hidden"]

EXPERT_KINDS = ("mlp", "glu")
#: router score functions: softmax over all E logits, softmax over the top-k logits only, sigmoid
SCORES = ("softmax", "topk_softmax", "sigmoid")
#: gated hidden functions other than ``act(gate) * up`` (moekit activation names), by name
GLU_FUNCTIONS = ("gpt_oss_swiglu",)


def glu_hidden(gate_up: Tensor, activation: str, params: Mapping[str, float] | None = None) -> Tensor:
    """The hidden units of a gated expert from ``[..., 2F]`` pre-activations (gate first, then up).

    ``activation`` is a moekit activation (``act(gate) * up``) or ``"gpt_oss_swiglu"``: GPT-OSS's
    clamped SwiGLU, ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, l)``
    (``params``: ``limit`` l, ``alpha``; transformers ``GptOssExperts._apply_gate``).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "gpt_oss_swiglu":
        p = dict(params or {})
        limit, alpha = float(p["limit"]), float(p["alpha"])
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))
    return activation_fn(activation)(gate) * up


@dataclass(frozen=True)
class RoutingSpec:
    """How a block routes (what merging/pruning must keep consistent).

    Attributes:
        score: ``"softmax"`` (all E logits), ``"topk_softmax"`` (softmax over the chosen k) or
            ``"sigmoid"`` (independent scores, DeepSeek-V3).
        top_k: experts per token.
        selection_bias: name of a per-expert tensor added to the scores for choosing only
            (``"e_score_correction_bias"``) or ``"router_bias"`` when the router itself has a bias;
            ``None`` when nothing can make an expert unreachable (padding needs it).
        groups: ``n_group`` of group-limited routing (experts split into equal contiguous groups,
            the best ``topk_group`` groups kept per token); 1 = no group limit.
        topk_group: groups kept per token.
        min_per_group: experts each group needs (DeepSeek-V3 scores a group by its top-2 scores).
        scaling: ``routed_scaling_factor`` applied to the gates (informational).
    """

    score: str = "softmax"
    top_k: int = 1
    selection_bias: str | None = None
    groups: int = 1
    topk_group: int = 1
    min_per_group: int = 1
    scaling: float = 1.0

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORES)

    def probabilities(self, logits_TE: Tensor) -> Tensor:
        """Per-expert scores the router derives from its logits (fp32): softmax or sigmoid."""
        logits = logits_TE.float()
        return torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, dim=-1)

    def reachable(self, num_experts: int) -> int:
        """Experts a token can reach when the block has ``num_experts``: all of them, or the
        ``topk_group`` best groups' worth under group-limited routing."""
        return num_experts if self.groups <= 1 else self.topk_group * (num_experts // self.groups)


@dataclass(frozen=True)
class ExpertLayerWeights:
    """One MoE block's routed experts and router.

    Attributes:
        kind: ``"mlp"`` or ``"glu"`` (see module docstring for tensor names and shapes).
        params: stacked expert tensors, each ``[E, ...]``.
        router_weight: ``[E, D]`` router (gate) weight.
        router_bias: ``[E]`` or None.
        activation: activation name (``moekit.experts.base.ACTIVATIONS`` or ``GLU_FUNCTIONS``).
        activation_params: constants of the activation (GPT-OSS: ``limit``, ``alpha``).
        router_extras: other per-expert router tensors ``{name: [E, ...]}`` that follow the router
            rows (DeepSeek-V3's ``e_score_correction_bias``); merged experts keep their dominant's.
    """

    kind: str
    params: dict[str, Tensor]
    router_weight: Tensor
    router_bias: Tensor | None = None
    activation: str = "silu"
    activation_params: Mapping[str, float] = field(default_factory=dict)
    router_extras: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, EXPERT_KINDS)
        sizes = {name: p.shape[0] for name, p in {**self.params, **self.router_extras}.items()}
        if len(set(sizes.values())) != 1 or self.router_weight.shape[0] not in sizes.values():
            raise ValueError(
                f"expert tensors and router must agree on the expert count, got {sizes} and "
                f"router_weight {tuple(self.router_weight.shape)}"
            )

    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[0]

    def replace(self, **changes: Any) -> "ExpertLayerWeights":
        """A copy with some fields changed (e.g. ``params=``, ``router_weight=``)."""
        return replace(self, **changes)

    def hidden(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert ``e``'s hidden units (the input of ``down_proj``) on tokens ``[N, D]``: ``[N, F]`` fp32."""
        p = self.params
        first = p["gate_up_proj" if self.kind == "glu" else "up_proj"][e].float()
        h = x_ND.float() @ first.t()
        if "up_bias" in p:
            h = h + p["up_bias"][e].float()
        if self.kind == "glu":
            return glu_hidden(h, self.activation, self.activation_params)
        return activation_fn(self.activation)(h)

    def down(self, h_NF: Tensor, e: int) -> Tensor:
        """Expert ``e``'s ``down_proj`` (+ bias) on hidden units ``[N, F]``: ``[N, D]`` fp32."""
        y = h_NF @ self.params["down_proj"][e].float().t()
        return y + self.params["down_bias"][e].float() if "down_bias" in self.params else y

    def expert_forward(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert ``e`` on tokens ``[N, D]``: ``[N, D]`` fp32 (plain ops, the reference)."""
        return self.down(self.hidden(x_ND, e), e)


@dataclass(frozen=True)
class BankWeights:
    """A block's expert bank alone (no router): ``kind`` (``"glu"``/``"mlp"``), moekit-layout tensors
    ``params`` (``[G, ...]``, see ``moekit.merging.weights``) and the activation's moekit name."""

    kind: str
    params: dict[str, Tensor]
    activation: str


@dataclass(frozen=True)
class LayerMergeResult:
    """A layer after merging E experts into G.

    Attributes:
        weights: the G merged experts; ``weights.router_weight`` is the *folded* router ``[G, D]``
            (rows of a group combined into one) for the plain form.
        expert_map: ``[E]`` int64, original expert -> merged expert, for the exact form (the original
            router keeps deciding; its choice e runs merged expert ``expert_map[e]``).
        dominant: ``[G]`` original id of each group's dominant expert.
    """

    weights: ExpertLayerWeights
    expert_map: Tensor
    dominant: Tensor

    @property
    def groups(self) -> Tensor:
        """``[E]`` group of each original expert (the same tensor as ``expert_map``)."""
        return self.expert_map
