"""The hand-off format between model families and the merging algorithms.

A family adapter (moekit's own layers, Hugging Face Mixtral/Qwen2-MoE/OLMoE/Switch, ...) reads one
MoE layer into ``ExpertLayerWeights``; merging returns a ``LayerMergeResult``; the adapter writes it
back. Expert tensors use moekit's bank layout (nn.Linear ``[E, out, in]``):

  kind "mlp": ``up_proj [E, F, D]``, ``down_proj [E, D, F]``, optional ``up_bias [E, F]``, ``down_bias [E, D]``
  kind "glu": ``gate_up_proj [E, 2F, D]`` (gate rows first), ``down_proj [E, D, F]``
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._checks import check_choice

__all__ = ["ExpertLayerWeights", "LayerMergeResult", "EXPERT_KINDS"]

EXPERT_KINDS = ("mlp", "glu")


@dataclass(frozen=True)
class ExpertLayerWeights:
    """One MoE layer's experts and router.

    Attributes:
        kind: ``"mlp"`` or ``"glu"`` (see module docstring for tensor names and shapes).
        params: stacked expert tensors, each ``[E, ...]``.
        router_weight: ``[E, D]`` router (gate) weight.
        router_bias: ``[E]`` or None.
        activation: activation name of the experts (``moekit.experts.base.ACTIVATIONS``).
    """

    kind: str
    params: dict[str, Tensor]
    router_weight: Tensor
    router_bias: Tensor | None = None
    activation: str = "silu"

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, EXPERT_KINDS)
        sizes = {name: p.shape[0] for name, p in self.params.items()}
        if len(set(sizes.values())) != 1 or self.router_weight.shape[0] not in sizes.values():
            raise ValueError(
                f"expert tensors and router must agree on the expert count, got {sizes} and "
                f"router_weight {tuple(self.router_weight.shape)}"
            )

    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[0]


@dataclass(frozen=True)
class LayerMergeResult:
    """A layer after merging E experts into G.

    Attributes:
        weights: the G merged experts; ``weights.router_weight`` is the *folded* router ``[G, D]``
            (rows of a group combined into one) for the plain form.
        expert_map: ``[E]`` int64, original expert -> merged expert, for the exact form (the original
            router keeps deciding; its choice e runs merged expert ``expert_map[e]``).
        groups: ``[E]`` same as expert_map, kept for reports; ``dominant``: ``[G]`` original id of each
            group's dominant expert.
    """

    weights: ExpertLayerWeights
    expert_map: Tensor
    dominant: Tensor

    @property
    def groups(self) -> Tensor:
        """``[E]`` group of each original expert (the same tensor as ``expert_map``)."""
        return self.expert_map
