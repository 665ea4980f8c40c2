"""Balancers: stateful controllers that act on router logits *before* expert selection.

State lives in buffers (saved with the model, restored on load); updates happen outside autograd,
in training mode only, from the routing decision of the step (like BatchNorm's running stats).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_int, check_positive
from .types import RoutingDecision

__all__ = [
    "Balancer",
    "AuxFreeBias",
    "ImportanceConstraint",
    "RelativeImportanceConstraint",
    "MeanImportanceConstraint",
    "BALANCERS",
    "create_balancer",
]

#: reduces per-expert counts across processes (expert/data parallel); identity on one process
CountReducer = Callable[[Tensor], Tensor]


class Balancer(nn.Module):
    """Base class: ``selection_logits`` adjusts logits used only to pick experts; ``observe``
    updates the state from a training step's decision."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.count_reducer: CountReducer | None = None

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        raise NotImplementedError

    def observe(self, decision: RoutingDecision) -> None:
        raise NotImplementedError

    def _global_counts(self, decision: RoutingDecision) -> Tensor:
        counts = decision.counts()
        return counts if self.count_reducer is None else self.count_reducer(counts)


class AuxFreeBias(Balancer):
    """Auxiliary-loss-free load balancing (Wang et al. 2024, https://arxiv.org/abs/2408.15664).

    A per-expert bias is added to the logits for *selection only*; the combine weights still come
    from the unbiased logits. After each training step ``bias_e += rate * sign(mean_load - load_e)``.
    """

    def __init__(self, num_experts: int, *, rate: float = 1e-3) -> None:
        super().__init__(num_experts)
        self.rate = check_positive("rate", rate)
        self.register_buffer("bias", torch.zeros(num_experts))

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        return logits_TE + self.bias.to(logits_TE.dtype)

    @torch.no_grad()
    def observe(self, decision: RoutingDecision) -> None:
        counts = self._global_counts(decision)
        self.bias.add_(self.rate * torch.sign(counts.mean() - counts))


class ImportanceConstraint(Balancer):
    """Hard constraint (Pavlitska et al., https://arxiv.org/abs/2204.10598): in training, experts whose
    usage statistic exceeds ``tau`` get their logits set to ``-inf`` for the whole batch before top-k,
    so they cannot be chosen and their gate weight is exactly 0. No masking in eval mode.

    Guard (the authors' code has none): at most ``E - k`` experts are masked; when more exceed
    ``tau``, only the ``E - k`` with the largest statistic are masked, so top-k never picks a
    masked expert. Subclasses keep the statistic in buffers and define ``statistic()``.
    """

    def __init__(self, num_experts: int, *, k: int, tau: float) -> None:
        super().__init__(num_experts)
        self.k = check_int("k", k, low=1, high=num_experts)
        self.tau = check_positive("tau", tau)

    def statistic(self) -> Tensor:
        """Per-expert over-use score ``[E]``, compared against ``tau``."""
        raise NotImplementedError

    def masked_experts(self) -> Tensor:
        """Bool ``[E]``: experts masked at the next training step."""
        score = self.statistic()
        over = score > self.tau
        budget = self.num_experts - self.k
        if int(over.sum()) > budget:
            keep = torch.zeros_like(over)
            if budget > 0:
                ranked = torch.where(over, score, torch.full_like(score, float("-inf")))
                keep[ranked.topk(budget).indices] = True
            over = keep
        return over

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        if not self.training:
            return logits_TE
        return logits_TE.masked_fill(self.masked_experts().to(logits_TE.device), float("-inf"))

    def _importance(self, decision: RoutingDecision) -> Tensor:
        """Batch importance ``Imp_e = sum_t G_te`` (post-top-k effective weights), reduced across processes."""
        imp = decision.gates_TE().detach().float().sum(0)
        return imp if self.count_reducer is None else self.count_reducer(imp)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, tau={self.tau}"


class RelativeImportanceConstraint(ImportanceConstraint):
    """Relative-importance constraint: ``r_e += (Imp_e - M/E) / (M/E)`` after every training step,
    where ``M = sum_e Imp_e`` (the batch size when nothing is dropped); expert e is masked while
    ``r_e > tau``. The sum is cumulative and never reset (paper's ResNet-18 default tau = 0.5)."""

    def __init__(self, num_experts: int, *, k: int, tau: float = 0.5) -> None:
        super().__init__(num_experts, k=k, tau=tau)
        self.register_buffer("deviation", torch.zeros(num_experts))

    def statistic(self) -> Tensor:
        return self.deviation

    @torch.no_grad()
    def observe(self, decision: RoutingDecision) -> None:
        imp = self._importance(decision)
        uniform = imp.sum() / self.num_experts
        if uniform > 0:
            self.deviation.add_((imp - uniform) / uniform)


class MeanImportanceConstraint(ImportanceConstraint):
    """Mean-importance constraint: a running mean (since the start of training) of each expert's
    share ``Imp_e / M`` of the batch gate mass; expert e is masked while ``share_e - 1/E > tau``
    (paper's default tau = 0.3)."""

    def __init__(self, num_experts: int, *, k: int, tau: float = 0.3) -> None:
        super().__init__(num_experts, k=k, tau=tau)
        self.register_buffer("mean_share", torch.zeros(num_experts))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def statistic(self) -> Tensor:
        return self.mean_share - 1.0 / self.num_experts

    @torch.no_grad()
    def observe(self, decision: RoutingDecision) -> None:
        imp = self._importance(decision)
        total = imp.sum()
        if total > 0:
            self.steps.add_(1)
            self.mean_share.add_((imp / total - self.mean_share) / self.steps.float())


#: balancer names used by model configs and experiments
BALANCERS: dict[str, type[Balancer]] = {
    "aux_free": AuxFreeBias,
    "relative": RelativeImportanceConstraint,
    "mean": MeanImportanceConstraint,
}


def create_balancer(name: str, num_experts: int, *, k: int, **kwargs: float) -> Balancer:
    """Build a balancer by name (``BALANCERS``); ``k`` is passed to the hard constraints only."""
    cls = BALANCERS[check_choice("balancer", name, BALANCERS)]
    if issubclass(cls, ImportanceConstraint):
        return cls(num_experts, k=k, **kwargs)
    return cls(num_experts, **kwargs)
