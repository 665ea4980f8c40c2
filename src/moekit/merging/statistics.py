"""Built-in statistics of the layer-wise observer (``moekit.registry.STATISTICS``).

Every statistic is per MoE block and sees routed tokens only (kept slots), unless its name says
otherwise. Sums are fp64; matrices keep their first ``max_tokens`` rows (calibration order).

=========================  =====================================================================
``counts``                 routed slots per expert ``[G]`` (activation frequency; M-SMoE, frequency)
``router_logits``          router logits of the first ``max_tokens`` tokens ``[T, E]`` (M-SMoE grouping)
``router_inputs``          block inputs of the first ``max_tokens`` tokens ``[T, D]`` (expert-output grouping)
``gate_sums``              sum of the gates of routed tokens per expert ``[G]`` (MoNE routing score)
``expert_output_norms``    per expert: sum of ``||f(x)||`` and of ``gate * ||f(x)||`` ``[G]`` (EAN, REAP)
``expert_output_moments``  per expert: sum of ``f(x)`` and of ``f(x)^2`` ``[G, D]`` (MoNE mean/variance)
``all_token_output_sums``  every expert on *every* token: sum of ``f(x)`` ``[G, D]`` (HC-SMoE; G x compute)
``down_proj_extremes``     per expert: max ``|y|`` and max ``y`` of the down_proj output ``[G]`` (super experts)
``input_moments``          per expert: sum of ``gate^2 x^2`` ``[G, D]`` and ``gate^2 h^2`` ``[G, F]``
                           (activation-weighted residual-row importance for compression)
=========================  =====================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import STATISTICS
from .observer import BlockCall, Statistic

__all__ = ["Counts", "RouterLogits", "RouterInputs", "GateSums", "ExpertOutputNorms", "ExpertOutputMoments",
           "AllTokenOutputSums", "DownProjExtremes", "InputMoments"]  # fmt: skip


class _FirstRows(Statistic):
    """The first ``max_tokens`` rows of a per-token matrix."""

    def __init__(self, num_experts: int, dim: int, max_tokens: int = 8192) -> None:
        super().__init__(num_experts, dim)
        self.max_tokens, self.rows, self.kept = max_tokens, [], 0

    def _add(self, rows: Tensor | None) -> None:
        if rows is None or self.kept >= self.max_tokens:
            return
        rows = rows.detach().float().cpu()[: self.max_tokens - self.kept]
        self.rows.append(rows)
        self.kept += rows.shape[0]

    def _cat(self, width: int) -> Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, width)


@STATISTICS.register("counts", summary="routed slots per expert (activation frequency)")
class Counts(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0

    def update(self, call: BlockCall) -> None:
        self.counts += call.counts()
        self.tokens += call.num_tokens

    def result(self) -> dict[str, Tensor]:
        return {"counts": self.counts.clone(), "tokens": torch.tensor(self.tokens, dtype=torch.int64)}


@STATISTICS.register("router_logits", paper="https://arxiv.org/abs/2310.01334", summary="router logits of the first max_tokens tokens")
class RouterLogits(_FirstRows):
    def update(self, call: BlockCall) -> None:
        self._add(call.logits_TE)

    def result(self) -> dict[str, Tensor]:
        return {"logits": self._cat(self.num_experts)}


@STATISTICS.register("router_inputs", summary="block inputs of the first max_tokens tokens")
class RouterInputs(_FirstRows):
    def update(self, call: BlockCall) -> None:
        self._add(call.x_TD)

    def result(self) -> dict[str, Tensor]:
        return {"inputs": self._cat(self.dim)}


@STATISTICS.register("gate_sums", summary="sum of the gates of routed tokens per expert")
class GateSums(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = torch.zeros(num_experts, dtype=torch.float64)

    def update(self, call: BlockCall) -> None:
        keep = call.kept_mask()
        self.sums.index_add_(0, call.ids_TK[keep].cpu(), call.weights_TK[keep].detach().double().cpu())

    def result(self) -> dict[str, Tensor]:
        return {"gate_sums": self.sums.clone()}


@STATISTICS.register("expert_output_norms", paper="https://arxiv.org/abs/2510.13999",
                     summary="per expert sum of ||f(x)|| and gate * ||f(x)|| over routed tokens")  # fmt: skip
class ExpertOutputNorms(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.norm_sums = torch.zeros(num_experts, dtype=torch.float64)
        self.gated_norm_sums = torch.zeros(num_experts, dtype=torch.float64)

    def update(self, call: BlockCall) -> None:
        for e in range(self.num_experts):
            io = call.expert_io(e)
            norms = io.y_ND.double().norm(dim=-1).cpu()
            self.norm_sums[e] += norms.sum()
            self.gated_norm_sums[e] += (io.gate_N.double().cpu() * norms).sum()

    def result(self) -> dict[str, Tensor]:
        return {"norm_sums": self.norm_sums.clone(), "gated_norm_sums": self.gated_norm_sums.clone()}


@STATISTICS.register("expert_output_moments", summary="per expert sum of f(x) and f(x)^2 over routed tokens")
class ExpertOutputMoments(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = torch.zeros(num_experts, dim, dtype=torch.float64)
        self.squares = torch.zeros(num_experts, dim, dtype=torch.float64)

    def update(self, call: BlockCall) -> None:
        for e in range(self.num_experts):
            y = call.expert_io(e).y_ND.double().cpu()
            self.sums[e] += y.sum(0)
            self.squares[e] += (y * y).sum(0)

    def result(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "squares": self.squares.clone()}


@STATISTICS.register("all_token_output_sums", paper="https://arxiv.org/abs/2410.08589",
                     summary="every expert on every token: sum of outputs (G x the routed compute)")  # fmt: skip
class AllTokenOutputSums(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.sums = torch.zeros(num_experts, dim, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def update(self, call: BlockCall) -> None:
        w = call.weights
        for e in range(self.num_experts):
            self.sums[e] += w.expert_forward(call.x_TD, e).double().sum(0).cpu()
        self.tokens += call.num_tokens

    def result(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "tokens": torch.tensor(self.tokens, dtype=torch.int64)}


@STATISTICS.register("down_proj_extremes", paper="https://arxiv.org/abs/2507.23279",
                     summary="per expert max |y| and max y of the down_proj output on routed tokens")  # fmt: skip
class DownProjExtremes(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.abs_max = torch.zeros(num_experts, dtype=torch.float64)
        self.max = torch.full((num_experts,), float("-inf"), dtype=torch.float64)

    def update(self, call: BlockCall) -> None:
        for e in range(self.num_experts):
            y = call.expert_io(e).y_ND
            if y.numel():
                self.abs_max[e] = max(float(self.abs_max[e]), float(y.abs().max()))
                self.max[e] = max(float(self.max[e]), float(y.max()))

    def result(self) -> dict[str, Tensor]:
        return {"abs_max": self.abs_max.clone(), "max": self.max.clone()}


@STATISTICS.register("input_moments", summary="per expert gate^2-weighted second moments of x and of the hidden units")
class InputMoments(Statistic):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.x2: Tensor | None = None
        self.h2: Tensor | None = None

    def update(self, call: BlockCall) -> None:
        for e in range(self.num_experts):
            io = call.expert_io(e)
            w2 = io.gate_N.double().pow(2).unsqueeze(1).cpu()
            if self.x2 is None or self.h2 is None:
                self.x2 = torch.zeros(self.num_experts, io.x_ND.shape[1], dtype=torch.float64)
                self.h2 = torch.zeros(self.num_experts, io.h_NF.shape[1], dtype=torch.float64)
            self.x2[e] += (w2 * io.x_ND.double().cpu().pow(2)).sum(0)
            self.h2[e] += (w2 * io.h_NF.double().cpu().pow(2)).sum(0)

    def result(self) -> dict[str, Tensor]:
        assert self.x2 is not None and self.h2 is not None
        return {"x2": self.x2.clone(), "h2": self.h2.clone()}
