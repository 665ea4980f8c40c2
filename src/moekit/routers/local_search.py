"""Permutation-based local search (COMET, Ibrahim et al. 2023, https://arxiv.org/abs/2306.02824) for any
sparse router: a learned permutation between the router's output slots and the experts.

For the first ``learn_steps`` training forward calls the gate weights are mixed by a doubly
stochastic matrix ``Pi = Sinkhorn(L / tau)`` (``L`` learnable ``[n, n]`` log-weights, ``tau``
annealed log-linearly from ``tau_start`` to ``tau_end``, Sinkhorn iterations growing linearly from
``iters_start`` to ``iters_end``), trained with the task loss plus an entropy penalty. Then the last
``Pi`` is rounded to a hard permutation with the Hungarian algorithm (once, on the CPU) and frozen:
expert ids are remapped by a lookup, so the router stays exactly as sparse as before. The schedule
(step, frozen flag, permutation) lives in buffers, so it survives ``state_dict`` save/load/resume.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive
from ..registry import ROUTERS
from ..types import RoutingDecision
from .base import Meta, Router
from .smooth_step import selector_entropy, sparse_decision

__all__ = ["PermutationLocalSearch", "sinkhorn", "hungarian", "local_search"]


def sinkhorn(log_alpha_NN: Tensor, iterations: int) -> Tensor:
    """Doubly stochastic ``exp`` of ``log_alpha`` by alternating row and column log-normalisation."""
    for _ in range(iterations):
        log_alpha_NN = log_alpha_NN - torch.logsumexp(log_alpha_NN, dim=1, keepdim=True)
        log_alpha_NN = log_alpha_NN - torch.logsumexp(log_alpha_NN, dim=0, keepdim=True)
    return log_alpha_NN.exp()


def hungarian(pi_NN: Tensor) -> Tensor:
    """The permutation maximising ``sum_s pi[s, perm[s]]`` (scipy ``linear_sum_assignment``): ``[n]`` long."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(pi_NN.detach().double().cpu().numpy(), maximize=True)
    perm = torch.empty(pi_NN.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(pi_NN.device)


class PermutationLocalSearch(Router):
    """Wraps a sparse router; slot ``s`` of the wrapped router's output feeds expert ``perm[s]``.

    Args:
        router: the wrapped router (``is_sparse`` must be True: top-k, hash, DSelect-k, COMET, ...).
        learn_steps: training forward calls during which the permutation is learned (>= 1).
        tau_start, tau_end: Sinkhorn temperature, annealed log-linearly (paper: 1e-3 -> 1e-7).
        iters_start, iters_end: Sinkhorn iterations, increased linearly (paper: 20 -> 150).

    While learning, ``gates' = gates @ Pi`` (rows rescaled to the original mass): ``Pi`` is dense up
    to exp underflow, so the decision holds every expert whose mixed weight is non-zero and sparse
    dispatch runs all of those -- this phase costs (up to) dense compute, as in the paper. Eval calls
    during learning use the current ``Pi`` without advancing the schedule. After freezing, ids are
    remapped through ``perm`` and nothing else changes. ``aux["perm_entropy"]`` (unweighted) is the
    mean row entropy of ``Pi`` plus that of its row-normalised form (0 once frozen); the wrapped
    router's aux terms pass through. Every ``[T, E]`` field is mapped slot -> expert the same way.
    """

    def __init__(
        self,
        router: Router,
        *,
        learn_steps: int,
        tau_start: float = 1e-3,
        tau_end: float = 1e-7,
        iters_start: int = 20,
        iters_end: int = 150,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(router, Router):
            raise TypeError(f"router must be a moekit Router, got {type(router).__name__}")
        if not router.is_sparse:
            raise ValueError(
                f"local search needs a sparse router (is_sparse=True: topk, hash, dselect, comet, ...); "
                f"got {type(router).__name__}, which is dense"
            )
        super().__init__(router.dim, router.num_experts, router.k, check_finite=False)
        self.router = router
        self.learn_steps = check_int("learn_steps", learn_steps, low=1)
        self.tau_start = check_positive("tau_start", tau_start)
        self.tau_end = check_positive("tau_end", tau_end)
        self.iters_start = check_int("iters_start", iters_start, low=1)
        self.iters_end = check_int("iters_end", iters_end, low=1)
        n = router.num_experts
        self.log_weights = nn.Parameter(torch.empty(n, n, device=device, dtype=dtype).uniform_(-0.05, 0.05))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("perm", torch.arange(n, device=device))

    # ----- schedule ---------------------------------------------------------------------------
    def _progress(self) -> float:
        return min(1.0, int(self.step) / self.learn_steps)

    def temperature(self) -> float:
        """Sinkhorn temperature at the current step."""
        a, b = math.log(self.tau_start), math.log(self.tau_end)
        return math.exp(a + (b - a) * self._progress())

    def iterations(self) -> int:
        """Sinkhorn iterations at the current step."""
        return round(self.iters_start + (self.iters_end - self.iters_start) * self._progress())

    def soft_permutation(self) -> Tensor:
        """``Pi`` ``[n, n]`` (fp32) at the current step of the schedule."""
        return sinkhorn(self.log_weights.float() / self.temperature(), self.iterations())

    def permutation(self) -> Tensor:
        """The hard permutation in use (frozen), or the Hungarian rounding of the current ``Pi``."""
        if bool(self.frozen):
            return self.perm.clone()
        with torch.no_grad():
            return hungarian(self.soft_permutation())

    # ----- routing ----------------------------------------------------------------------------
    def route(self, x_TD: Tensor, meta: Meta | None) -> RoutingDecision:
        inner = self.router(x_TD, meta=meta)
        if bool(self.frozen):
            return self._apply_hard(inner)
        pi = self.soft_permutation()
        if self.training:
            with torch.no_grad():
                self.step += 1
                if int(self.step) >= self.learn_steps:
                    self.perm.copy_(hungarian(pi))
                    self.frozen.fill_(True)
        return self._apply_soft(inner, pi)

    def _apply_hard(self, d: RoutingDecision) -> RoutingDecision:
        inverse = torch.argsort(self.perm)
        remap = {
            f: getattr(d, f)[:, inverse] for f in ("logits_TE", "probs_TE", "load_prob_TE") if getattr(d, f) is not None
        }
        aux = {**d.aux, "perm_entropy": torch.zeros((), device=d.weights_TK.device)}
        return replace(d, ids_TK=self.perm[d.ids_TK], aux=aux, **remap)

    def _apply_soft(self, d: RoutingDecision, pi: Tensor) -> RoutingDecision:
        gates = d.gates_TE().float()
        mixed = gates @ pi
        mixed = mixed * (gates.sum(-1, keepdim=True) / mixed.sum(-1, keepdim=True).clamp_min(1e-30))
        remap = {
            f: getattr(d, f).float() @ pi
            for f in ("logits_TE", "probs_TE", "load_prob_TE")
            if getattr(d, f) is not None
        }
        rows = pi / pi.sum(-1, keepdim=True)
        aux = {**d.aux, "perm_entropy": selector_entropy(pi).mean() + selector_entropy(rows).mean()}
        return sparse_decision(mixed, self.k, aux=aux, extras=d.extras, **remap)

    def extra_repr(self) -> str:
        return (
            f"learn_steps={self.learn_steps}, tau={self.tau_start:g}->{self.tau_end:g}, "
            f"iters={self.iters_start}->{self.iters_end}"
        )


@ROUTERS.register(
    "local_search",
    paper="https://arxiv.org/abs/2306.02824",
    summary="permutation local search around a sparse router (COMET+, top-k+, ...)",
)
def local_search(
    dim: int,
    num_experts: int,
    k: int = 2,
    *,
    base: str = "topk",
    base_kwargs: Mapping[str, Any] | None = None,
    learn_steps: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **schedule: Any,
) -> PermutationLocalSearch:
    """Build router ``base`` by name and wrap it, e.g. ``create_router("local_search", dim=64,
    num_experts=16, k=2, base="comet", base_kwargs={"gamma": 1.0}, learn_steps=500)``.
    ``schedule``: ``tau_start``, ``tau_end``, ``iters_start``, ``iters_end``."""
    factory = ROUTERS.get(base)
    kwargs = {"dim": dim, "num_experts": num_experts, **(base_kwargs or {}), "device": device, "dtype": dtype}
    if "k" in inspect.signature(factory).parameters:
        kwargs["k"] = k
    inner = factory(**kwargs)
    return PermutationLocalSearch(inner, learn_steps=learn_steps, device=device, dtype=dtype, **schedule)
