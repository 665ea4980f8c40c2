"""The two values that flow between moekit's parts: a routing decision and a layer output.

Shape suffixes: T tokens (or examples), E experts, K experts chosen per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["RoutingDecision", "MoEOutput"]


@dataclass(frozen=True)
class RoutingDecision:
    """What a router decided for a batch of T tokens over E experts.

    Attributes:
        ids_TK: chosen expert per token and slot, int64 in ``[0, E)``.
        weights_TK: combine weight per slot (already normalised as the router intends).
        num_experts: E.
        logits_TE: raw router logits (fp32) when the router has them.
        probs_TE: the router's full distribution over experts when it has one.
        kept_TK: bool mask of slots that survive capacity limits; ``None`` means all kept.
        load_prob_TE: Shazeer's smooth probability that expert e is among token t's top-k
            (noisy top-k only); used by the differentiable load loss.
        aux: *unweighted* auxiliary terms the router adds (scalars), e.g. an entropy term.
        extras: per-token tensors a gradient estimator needs later (e.g. REINFORCE's log-probability
            and baseline), never summed into the loss by generic code.
    """

    ids_TK: Tensor
    weights_TK: Tensor
    num_experts: int
    logits_TE: Tensor | None = None
    probs_TE: Tensor | None = None
    kept_TK: Tensor | None = None
    load_prob_TE: Tensor | None = None
    aux: Mapping[str, Tensor] = field(default_factory=dict)
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.ids_TK.shape[0]

    @property
    def k(self) -> int:
        return self.ids_TK.shape[1]

    def kept_mask(self) -> Tensor:
        """Bool ``[T, K]`` mask of live slots (all ``True`` when nothing was dropped)."""
        if self.kept_TK is None:
            return torch.ones_like(self.ids_TK, dtype=torch.bool)
        return self.kept_TK

    def effective_weights(self) -> Tensor:
        """``weights_TK`` with dropped slots zeroed: what the combine actually uses."""
        if self.kept_TK is None:
            return self.weights_TK
        return self.weights_TK * self.kept_TK.to(self.weights_TK.dtype)

    def counts(self) -> Tensor:
        """Tokens routed to each expert (kept slots only): float ``[E]``."""
        ids = self.ids_TK[self.kept_mask()]
        return torch.bincount(ids, minlength=self.num_experts).to(torch.float32)

    def gates_TE(self) -> Tensor:
        """Dense ``[T, E]`` matrix of effective combine weights (zeros for unchosen experts)."""
        gates = torch.zeros(
            self.num_tokens, self.num_experts, dtype=self.weights_TK.dtype, device=self.ids_TK.device
        )
        return gates.scatter_add(1, self.ids_TK, self.effective_weights())

    def with_aux(self, **terms: Tensor) -> "RoutingDecision":
        """A copy with extra unweighted aux terms merged in."""
        return replace(self, aux={**self.aux, **terms})


@dataclass(frozen=True)
class MoEOutput:
    """What every moekit MoE layer returns, whatever its flags.

    Attributes:
        y: the layer output, same leading shape as the input.
        aux: unweighted auxiliary terms (router terms; training code weights and sums them).
        decision: the routing decision, for statistics and analysis.
    """

    y: Tensor
    aux: Mapping[str, Tensor]
    decision: RoutingDecision
