"""Two parameter-averaging baselines of the SMEAR comparison (https://arxiv.org/abs/2306.03745), as
dense routers for a merged-expert layer (``moekit.SMEAR(bank, router)``):

* ``AdamixRouter`` (Wang et al. 2022, https://arxiv.org/abs/2205.12410): a uniformly random expert per
  example in training, the average of all experts at inference. (The official SMEAR code draws the
  down- and up-projection experts separately; here one draw picks the whole adapter.)
* ``LatentSkillsRouter`` (Ponti et al. 2022, Polytropon, https://arxiv.org/abs/2202.13914): a learned
  tag x expert logit matrix; training samples each expert's weight from RelaxedBernoulli(tau, logits),
  inference uses the sigmoid; weights are normalised to sum to 1. The input is not used: routing
  depends on the example's tag (task, domain) only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import Meta, Router
from .hash import _meta_tensor

__all__ = ["AdamixRouter", "LatentSkillsRouter"]


def _dense(weights_TE: Tensor, num_experts: int, logits_TE: Tensor | None = None) -> RoutingDecision:
    ids = torch.arange(num_experts, device=weights_TE.device).expand(weights_TE.shape[0], -1)
    return RoutingDecision(ids_TK=ids, weights_TK=weights_TE, num_experts=num_experts, logits_TE=logits_TE)


@ROUTERS.register("adamix", paper="https://arxiv.org/abs/2205.12410",
                  summary="random expert per example in training, expert average at inference")  # fmt: skip
class AdamixRouter(Router):
    """Weights ``[T, E]``: one-hot on a random expert (training) or ``1/E`` everywhere (eval). No parameters."""

    is_sparse = False

    def __init__(self, dim: int, num_experts: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(dim, num_experts, num_experts, check_finite=False)

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        if self.training:
            pick = torch.randint(E, (T,), device=x_TD.device)
            weights = torch.nn.functional.one_hot(pick, E).float()
        else:
            weights = torch.full((T, E), 1.0 / E, device=x_TD.device)
        return _dense(weights, E)


@ROUTERS.register("latent_skills", paper="https://arxiv.org/abs/2202.13914",
                  summary="learned tag x expert skill logits (Polytropon), relaxed Bernoulli in training")  # fmt: skip
class LatentSkillsRouter(Router):
    """``weights = normalise(s)``, ``s ~ RelaxedBernoulli(tau, skill_logits[tag])`` in training and
    ``s = sigmoid(skill_logits[tag])`` in eval.

    Args:
        num_tags: number of distinct tags (default: one per expert).
        key: the ``meta`` entry holding each example's tag (``[T]`` integers).
        tau: temperature of the relaxed Bernoulli.
    """

    is_sparse = False

    def __init__(self, dim: int, num_experts: int, *, num_tags: int | None = None, key: str = "tag",
                 tau: float = 1.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(dim, num_experts, num_experts, check_finite=False)
        self.num_tags = check_int("num_tags", num_tags if num_tags is not None else num_experts, low=1)
        self.key = key
        self.tau = check_positive("tau", tau)
        self.skill_logits = nn.Parameter(torch.empty(self.num_tags, num_experts, device=device).uniform_(-1e-3, 1e-3))

    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        tags = _meta_tensor(meta, self.key, x_TD.shape[0], type(self).__name__).to(self.skill_logits.device)
        if tags.numel() and (int(tags.min()) < 0 or int(tags.max()) >= self.num_tags):
            raise ValueError(f"meta[{self.key!r}] must lie in [0, num_tags={self.num_tags}), got range "
                             f"[{int(tags.min())}, {int(tags.max())}]")  # fmt: skip
        logits = self.skill_logits[tags].float()
        if self.training:
            scores = torch.distributions.RelaxedBernoulli(torch.tensor(self.tau), logits=logits).rsample()
        else:
            scores = torch.sigmoid(logits)
        weights = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
        return _dense(weights.to(x_TD.device), self.num_experts, logits.to(x_TD.device))
