"""Built-in statistics of the layer-wise observer (``moekit.registry.STATISTICS``).

Every statistic is per MoE block and sees routed tokens only (kept slots), unless its name says
otherwise. Sums are fp64 and weighted by the calls' ``sample_weight`` (calibration mixing, 1 by
default); per-token matrices are seeded weighted reservoir samples of ``max_tokens`` rows
(Efraimidis-Spirakis A-Res, returned in calibration order: while the data has at most ``max_tokens``
tokens that is every row, in order). Memory is O(E * D) per block plus the reservoirs.

=========================  =====================================================================
``counts``                 routed slots per expert ``[G]`` (activation frequency; M-SMoE, frequency)
``router_logits``          router logits of sampled tokens ``[T, E]`` (M-SMoE grouping, redirects)
``router_inputs``          block inputs of sampled tokens ``[T, D]`` (expert-output grouping)
``router_prob_sums``       sum over *all* tokens of the router's probabilities ``[E]``
``gate_sums``              sum of the gates of routed tokens per expert ``[G]`` (MoNE routing score)
``expert_output_norms``    per expert: routed count, sum of ``||f(x)||`` (EAN) and of ``g * ||f(x)||``
                           for three gates: the real gate, the full-softmax probability, and the
                           probability renormalised over the token's top-k (REAP) ``[G]``
``expert_output_moments``  per expert: sum of ``f(x)`` and of ``f(x)^2`` ``[G, D]`` (MoNE mean/variance)
``all_token_output_sums``  every expert on *every* token: sum of ``f(x)`` ``[G, D]`` (HC-SMoE; G x compute)
``down_proj_extremes``     per expert: max ``|y|`` and max ``y`` of the down_proj output ``[G]`` (super experts)
``layer_io``               sampled tokens with their inputs, logits and routing ``[T, ...]`` (NAEE)
``input_moments``          per expert: sum of ``gate^2 x^2`` ``[G, D]`` and ``gate^2 h^2`` ``[G, F]``
                           (activation-weighted residual-row importance for compression)
=========================  =====================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import STATISTICS
from .observer import BlockCall, Statistic

__all__ = ["Counts", "RouterLogits", "RouterInputs", "RouterProbSums", "GateSums", "ExpertOutputNorms",
           "ExpertOutputMoments", "AllTokenOutputSums", "DownProjExtremes", "LayerIO", "InputMoments",
           "Reservoir"]  # fmt: skip


class Reservoir:
    """A seeded weighted reservoir sample of at most ``size`` rows (A-Res: row key ``u^(1/w)``, the
    ``size`` largest keys kept), returned in arrival order. Rows of weight 0 are never kept."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {size!r}")
        self.size = size
        self.gen = torch.Generator().manual_seed(int(seed))
        self.rows: Tensor | None = None
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.order = torch.zeros(0, dtype=torch.int64)
        self.seen = 0

    def add(self, rows: Tensor | None, weight: float = 1.0) -> None:
        if rows is None or rows.shape[0] == 0:
            return
        n = rows.shape[0]
        u = torch.rand(n, generator=self.gen, dtype=torch.float64).clamp_min(1e-300)
        order = torch.arange(self.seen, self.seen + n)
        self.seen += n
        if weight <= 0:
            return
        rows = rows.detach().float().cpu()
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])
        self.keys = torch.cat([self.keys, u.log() / weight])
        self.order = torch.cat([self.order, order])
        if self.rows.shape[0] > self.size:
            keep = torch.topk(self.keys, self.size).indices
            keep = keep[torch.argsort(self.order[keep])]
            self.rows, self.keys, self.order = self.rows[keep], self.keys[keep], self.order[keep]

    def result(self, width: int) -> Tensor:
        return self.rows.clone() if self.rows is not None else torch.zeros(0, width)


class _Sampled(Statistic):
    """A reservoir of per-token rows (options ``max_tokens``, ``seed``)."""

    def __init__(self, num_experts: int, dim: int, max_tokens: int = 8192, seed: int = 0) -> None:
        super().__init__(num_experts, dim)
        self.reservoir = Reservoir(max_tokens, seed)


@STATISTICS.register("counts", summary="routed slots per expert (activation frequency)")
class Counts(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0
        self.weight = 0.0

    def update(self, call: BlockCall) -> None:
        self.counts += call.sample_weight * call.counts()
        self.tokens += call.num_tokens
        self.weight += call.sample_weight * call.num_tokens

    def result(self) -> dict[str, Tensor]:
        return {"counts": self.counts.clone(), "tokens": torch.tensor(self.tokens, dtype=torch.int64),
                "weight": torch.tensor(self.weight, dtype=torch.float64)}  # fmt: skip


@STATISTICS.register("router_logits", paper="https://arxiv.org/abs/2310.01334", summary="router logits of sampled tokens")
class RouterLogits(_Sampled):
    def update(self, call: BlockCall) -> None:
        self.reservoir.add(call.logits_TE, call.sample_weight)

    def result(self) -> dict[str, Tensor]:
        return {"logits": self.reservoir.result(self.num_experts)}


@STATISTICS.register("router_inputs", summary="block inputs of sampled tokens")
class RouterInputs(_Sampled):
    def update(self, call: BlockCall) -> None:
        self.reservoir.add(call.x_TD, call.sample_weight)

    def result(self) -> dict[str, Tensor]:
        return {"inputs": self.reservoir.result(self.dim)}


def _need_logits(call: BlockCall, what: str) -> Tensor:
    if call.logits_TE is None:
        raise ValueError(f"statistic {what!r} needs the router's logits, which this block's adapter does not report")
    return call.logits_TE


@STATISTICS.register("router_prob_sums", summary="sum over all tokens of the router's probabilities")
class RouterProbSums(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums: Tensor | None = None
        self.weight = 0.0

    def update(self, call: BlockCall) -> None:
        probs = call.routing.probabilities(_need_logits(call, "router_prob_sums")).double().sum(0).cpu()
        self.sums = call.sample_weight * probs if self.sums is None else self.sums + call.sample_weight * probs
        self.weight += call.sample_weight * call.num_tokens

    def result(self) -> dict[str, Tensor]:
        assert self.sums is not None
        return {"prob_sums": self.sums.clone(), "weight": torch.tensor(self.weight, dtype=torch.float64)}


@STATISTICS.register("gate_sums", summary="sum of the gates of routed tokens per expert")
class GateSums(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = torch.zeros(num_experts, dtype=torch.float64)
        self.weight = 0.0

    def update(self, call: BlockCall) -> None:
        keep = call.kept_mask()
        self.sums.index_add_(0, call.ids_TK[keep].cpu(), call.sample_weight * call.weights_TK[keep].detach().double().cpu())
        self.weight += call.sample_weight * call.num_tokens

    def result(self) -> dict[str, Tensor]:
        return {"gate_sums": self.sums.clone(), "weight": torch.tensor(self.weight, dtype=torch.float64)}


@STATISTICS.register("expert_output_norms", paper="https://arxiv.org/abs/2510.13999",
                     summary="per expert: routed count, sum of ||f(x)|| and of gate * ||f(x)|| (three gates)")  # fmt: skip
class ExpertOutputNorms(Statistic):
    """Keys: ``counts``, ``norm_sums`` (EAN), ``gated_norm_sums`` (the gate the expert's output was
    really multiplied by), ``prob_norm_sums`` (full-softmax probability of the expert),
    ``renorm_norm_sums`` (that probability divided by the sum of the token's top-k probabilities:
    REAP's ``renormalize_router_weights=True``). All over routed tokens, fp64."""

    KEYS = ("counts", "norm_sums", "gated_norm_sums", "prob_norm_sums", "renorm_norm_sums")

    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = {k: torch.zeros(num_experts, dtype=torch.float64) for k in self.KEYS}

    def update(self, call: BlockCall) -> None:
        probs = call.routing.probabilities(_need_logits(call, "expert_output_norms")).double().cpu()
        denominator = probs.gather(1, call.router_choices().cpu()).sum(1).clamp_min(1e-12)
        w = call.sample_weight
        for e in range(self.num_experts):
            io = call.expert_io(e)
            token = io.token_N.cpu()
            norms = io.y_ND.double().norm(dim=-1).cpu()
            router_e = call.router_choices().cpu()[token, io.slot_N.cpu()] if token.numel() else token
            p = probs[token, router_e]
            self.sums["counts"][e] += w * norms.shape[0]
            self.sums["norm_sums"][e] += w * norms.sum()
            self.sums["gated_norm_sums"][e] += w * (io.gate_N.double().cpu() * norms).sum()
            self.sums["prob_norm_sums"][e] += w * (p * norms).sum()
            self.sums["renorm_norm_sums"][e] += w * (p / denominator[token] * norms).sum()

    def result(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.sums.items()}


@STATISTICS.register("expert_output_moments", summary="per expert sum of f(x) and f(x)^2 over routed tokens")
class ExpertOutputMoments(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = torch.zeros(num_experts, dim, dtype=torch.float64)
        self.squares = torch.zeros(num_experts, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_experts, dtype=torch.float64)

    def update(self, call: BlockCall) -> None:
        w = call.sample_weight
        for e in range(self.num_experts):
            y = call.expert_io(e).y_ND.double().cpu()
            self.sums[e] += w * y.sum(0)
            self.squares[e] += w * (y * y).sum(0)
            self.counts[e] += w * y.shape[0]

    def result(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "squares": self.squares.clone(), "counts": self.counts.clone()}


@STATISTICS.register("all_token_output_sums", paper="https://arxiv.org/abs/2410.08589",
                     summary="every expert on every token: sum of outputs (G x the routed compute)")  # fmt: skip
class AllTokenOutputSums(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = torch.zeros(num_experts, dim, dtype=torch.float64)
        self.tokens = 0.0

    @torch.no_grad()
    def update(self, call: BlockCall) -> None:
        w = call.weights
        for e in range(self.num_experts):
            self.sums[e] += call.sample_weight * w.expert_forward(call.x_TD, e).double().sum(0).cpu()
        self.tokens += call.sample_weight * call.num_tokens

    def result(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "tokens": torch.tensor(self.tokens, dtype=torch.float64)}


@STATISTICS.register("down_proj_extremes", paper="https://arxiv.org/abs/2507.23279",
                     summary="per expert max |y| and max y of the down_proj output on routed tokens")  # fmt: skip
class DownProjExtremes(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.abs_max = torch.zeros(num_experts, dtype=torch.float64)
        self.max = torch.full((num_experts,), float("-inf"), dtype=torch.float64)

    def update(self, call: BlockCall) -> None:
        if call.sample_weight <= 0:
            return
        for e in range(self.num_experts):
            y = call.expert_io(e).y_ND
            if y.numel():
                self.abs_max[e] = max(float(self.abs_max[e]), float(y.abs().max()))
                self.max[e] = max(float(self.max[e]), float(y.max()))

    def result(self) -> dict[str, Tensor]:
        return {"abs_max": self.abs_max.clone(), "max": self.max.clone()}


@STATISTICS.register("layer_io", paper="https://arxiv.org/abs/2402.14800",
                     summary="sampled tokens: block input, router logits, chosen experts and gates (NAEE)")  # fmt: skip
class LayerIO(_Sampled):
    """Keys: ``inputs [T, D]``, ``logits [T, E]``, ``ids [T, K]`` (router choices), ``gates [T, K]``
    (0 for capacity-dropped slots): enough to recompute the block's output on the sampled tokens."""

    def __init__(self, num_experts: int, dim: int, max_tokens: int = 2048, seed: int = 0) -> None:
        super().__init__(num_experts, dim, max_tokens, seed)
        self.E = self.K = 0

    def update(self, call: BlockCall) -> None:
        logits = _need_logits(call, "layer_io")
        ids = call.router_choices()
        gates = call.weights_TK.float() * call.kept_mask().float()
        self.E, self.K = logits.shape[1], ids.shape[1]
        self.reservoir.add(torch.cat([call.x_TD.float(), logits.float(), ids.float(), gates], dim=1), call.sample_weight)

    def result(self) -> dict[str, Tensor]:
        rows = self.reservoir.result(self.dim + self.E + 2 * self.K)
        D, E, K = self.dim, self.E, self.K
        return {"inputs": rows[:, :D], "logits": rows[:, D:D + E], "ids": rows[:, D + E:D + E + K].long(),
                "gates": rows[:, D + E + K:]}  # fmt: skip


@STATISTICS.register("input_moments", summary="per expert gate^2-weighted second moments of x and of the hidden units")
class InputMoments(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.x2: Tensor | None = None
        self.h2: Tensor | None = None

    def update(self, call: BlockCall) -> None:
        for e in range(self.num_experts):
            io = call.expert_io(e)
            w2 = call.sample_weight * io.gate_N.double().pow(2).unsqueeze(1).cpu()
            if self.x2 is None or self.h2 is None:
                self.x2 = torch.zeros(self.num_experts, io.x_ND.shape[1], dtype=torch.float64)
                self.h2 = torch.zeros(self.num_experts, io.h_NF.shape[1], dtype=torch.float64)
            self.x2[e] += (w2 * io.x_ND.double().cpu().pow(2)).sum(0)
            self.h2[e] += (w2 * io.h_NF.double().cpu().pow(2)).sum(0)

    def result(self) -> dict[str, Tensor]:
        assert self.x2 is not None and self.h2 is not None
        return {"x2": self.x2.clone(), "h2": self.h2.clone()}
