"""Low-rank + structured-sparse experts (MC-SMoE, https://arxiv.org/abs/2310.01334, Sec. 3.2; LoSparse,
https://arxiv.org/abs/2306.11222): each expert weight ``W [O, I]`` is ``U V + S`` with ``U [O, r]``,
``V [r, I]`` from the truncated SVD and the residual ``S`` pruned by whole rows (a row mask). Built by
``moekit.merging.compress_experts``, pruned by ``moekit.merging.StructuredPruner``, stored at its real
size as ``moekit.experts.packed.PackedLowRankSparseExperts``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .base import ExpertBank, activation_fn
from .grouped import grouped_linear
from .inference import expert_linear
from .mlp import GLUExperts, MLPExperts

__all__ = ["LowRankSparseExperts", "two_matrix_forward"]


def _svd_split(w_GOI: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(w_GOI.detach().double(), full_matrices=False)
    root = S[:, :rank].sqrt()
    return (U[..., :rank] * root[:, None, :]).to(w_GOI.dtype), (root[..., None] * Vh[:, :rank]).to(w_GOI.dtype)


class LowRankSparseExperts(ExpertBank):
    """An ``mlp`` or ``glu`` bank whose weight matrices are ``U V + S * row_mask``.

    For each matrix ``m`` (``gate_up_proj``/``up_proj`` and ``down_proj``): parameters ``{m}_u
    [E, O, r]``, ``{m}_v [E, r, I]``, ``{m}_s [E, O, I]`` and buffer ``{m}_mask [E, O]`` (1 = row of S
    kept). Build with ``from_bank``. Runs the factorised form: ``x V^T U^T + x (S * mask)^T``.
    """

    def __init__(self, bank: GLUExperts | MLPExperts, rank: int) -> None:
        if not isinstance(bank, (GLUExperts, MLPExperts)):
            raise TypeError(f"bank must be GLUExperts or MLPExperts, got {type(bank).__name__}")
        super().__init__(bank.num_experts, bank.dim, bank.out_dim)
        self.kind = "glu" if isinstance(bank, GLUExperts) else "mlp"
        self.hidden, self.activation = bank.hidden, bank.activation
        self._act = activation_fn(bank.activation)
        self.matrices = ("gate_up_proj", "down_proj") if self.kind == "glu" else ("up_proj", "down_proj")
        self.rank = check_int("rank", rank, low=1)
        for m in self.matrices:
            w = getattr(bank, m).detach()
            r = min(rank, w.shape[1], w.shape[2])
            u, v = _svd_split(w, r)
            setattr(self, f"{m}_u", nn.Parameter(u))
            setattr(self, f"{m}_v", nn.Parameter(v))
            setattr(self, f"{m}_s", nn.Parameter(w - u @ v))
            self.register_buffer(f"{m}_mask", torch.ones(w.shape[:2], dtype=w.dtype, device=w.device))
        for b in ("up_bias", "down_bias"):
            if getattr(bank, b, None) is not None:
                setattr(self, b, nn.Parameter(getattr(bank, b).detach().clone()))

    @classmethod
    def from_bank(cls, bank: GLUExperts | MLPExperts, rank: int) -> "LowRankSparseExperts":
        """SVD-initialised factorisation of ``bank`` (same function up to float rounding)."""
        return cls(bank, rank)

    def masked_residual(self, m: str, params: Mapping[str, Tensor] | None = None) -> Tensor:
        s = (params or dict(self.named_parameters(recurse=False)))[f"{m}_s"]
        return s * getattr(self, f"{m}_mask").unsqueeze(-1)

    def dense_weight(self, m: str) -> Tensor:
        """``U V + S * mask`` for matrix ``m``: ``[E, O, I]``."""
        return getattr(self, f"{m}_u") @ getattr(self, f"{m}_v") + self.masked_residual(m)

    def _linear(self, x: Tensor, m: str, params: Mapping[str, Tensor], sizes: Tensor) -> Tensor:
        low = grouped_linear(grouped_linear(x, params[f"{m}_v"], sizes), params[f"{m}_u"], sizes)
        return low + grouped_linear(x, self.masked_residual(m, params), sizes)

    def _hidden(self, h: Tensor) -> Tensor:
        if self.kind == "glu":
            gate, up = h.chunk(2, dim=-1)
            return self._act(gate) * up
        return self._act(h)

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        return two_matrix_forward(self, x_N, params, sizes_G)

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        first, second = self.matrices
        up_b = getattr(self, "up_bias", None)
        down_b = getattr(self, "down_bias", None)
        h = F.linear(x_N, self.dense_weight(first)[e], None if up_b is None else up_b[e])
        return F.linear(self._hidden(h), self.dense_weight(second)[e], None if down_b is None else down_b[e])

    #: the inference path runs one expert at a time (``expert_inference``) at every size
    inference_sorted_gemm = False

    def expert_inference(self, x_N: Tensor, e: int, packed: Mapping[str, Sequence[Tensor]] | None = None) -> Tensor:
        """Forward only: the factors and ``S_e`` read once (the mask applied to ``x S_e^T``)."""
        return two_matrix_expert(self, x_N, e)

    def _expert_linear(self, x_MI: Tensor, m: str, e: int) -> Tensor:
        """``x (U_e V_e + S_e * mask_e)^T`` reading ``S_e`` once: ``[M, I] -> [M, O]``."""
        low = expert_linear(expert_linear(x_MI, getattr(self, f"{m}_v")[e]), getattr(self, f"{m}_u")[e])
        return torch.addcmul(low, expert_linear(x_MI, getattr(self, f"{m}_s")[e]), getattr(self, f"{m}_mask")[e])

    def compression_layout(self) -> dict[str, Any]:
        """``{"rank": r, "kept_rows": None}``: what a model config stores for this dense-masked form
        (the mask is a buffer, so every shape follows from the rank; packed banks list their kept rows)."""
        return {"rank": self.rank, "kept_rows": None}

    def kept_residual_entries(self) -> int:
        return int(sum((getattr(self, f"{m}_mask").sum() * getattr(self, f"{m}_s").shape[-1]).item() for m in self.matrices))

    def parameter_count(self) -> int:
        """Stored parameters: the factors, the kept rows of S, and biases (pruned rows not counted)."""
        dense = sum(p.numel() for n, p in self.named_parameters(recurse=False) if not n.endswith("_s"))
        return dense + self.kept_residual_entries()

    def flops_per_token_E(self) -> Tensor:
        """Forward FLOPs (2 per multiply-add) of each expert on one token: ``[E]``."""
        total = torch.zeros(self.num_experts, dtype=torch.float64)
        for m in self.matrices:
            u, v = getattr(self, f"{m}_u"), getattr(self, f"{m}_v")
            kept_rows = getattr(self, f"{m}_mask").sum(-1).double().cpu()
            total += 2 * (u.shape[-1] * (u.shape[1] + v.shape[-1]) + kept_rows * v.shape[-1])
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, hidden={self.hidden}, rank={self.rank}"


def two_matrix_expert(bank: Any, x_MI: Tensor, e: int) -> Tensor:
    """Expert ``e`` of a compressed bank, forward only: ``down(hidden(up(x) + up_bias)) + down_bias`` with
    each matrix applied by ``bank._expert_linear`` (``[M, dim] -> [M, out_dim]``; the inference path)."""
    first, second = bank.matrices
    up_b, down_b = getattr(bank, "up_bias", None), getattr(bank, "down_bias", None)
    h = bank._expert_linear(x_MI, first, e)
    if up_b is not None:
        h = h + up_b[e]
    y = bank._expert_linear(bank._hidden(h), second, e)
    return y if down_b is None else y + down_b[e]


def two_matrix_forward(bank: Any, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
    """``down(hidden(up(x) + up_bias)) + down_bias`` group by group, for banks whose two weight
    matrices ``bank.matrices`` are applied by ``bank._linear`` (low-rank + sparse, dense or packed)."""
    first, second = bank.matrices
    h = bank._linear(x_N, first, params, sizes_G)
    if params.get("up_bias") is not None:
        h = h + torch.repeat_interleave(params["up_bias"], sizes_G, dim=0, output_size=x_N.shape[0])
    y = bank._linear(bank._hidden(h), second, params, sizes_G)
    if params.get("down_bias") is not None:
        y = y + torch.repeat_interleave(params["down_bias"], sizes_G, dim=0, output_size=x_N.shape[0])
    return y
