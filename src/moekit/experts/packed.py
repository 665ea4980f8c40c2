"""Packed low-rank + sparse experts: MC-SMoE's compressed experts stored at their real size.

``LowRankSparseExperts`` (``lowrank.py``) keeps the residual ``S`` dense, ``[E, O, I]``, with a row
mask, so the fine-tune can move the global pruning threshold; after pruning (paper: 10% kept,
https://arxiv.org/abs/2310.01334, Sec. 3.2) 90% of it is zeros. ``PackedLowRankSparseExperts`` keeps
only the kept rows. Per weight matrix ``m`` (``gate_up_proj``/``up_proj``, ``down_proj``):

* ``{m}_u [E, O, r]``, ``{m}_v [E, r, I]``: the low-rank factors, as before;
* ``{m}_s [K, I]``: the K kept rows of ``S``, expert-major, ascending row id within an expert;
* ``{m}_index [K]`` (int32 buffer): flat position ``e * O + o`` of each kept row, strictly increasing.

The layout -- kept rows per expert, per matrix -- is a constructor argument (``kept_rows``), so a
model config rebuilds every shape and ``load_state_dict`` loads strictly; loading checks the stored
index against that layout. Why one flat ``[K, I]`` block and not a per-expert ``[E, max_e k_e, I]``
padded one: the global threshold keeps very different numbers of rows per expert and per layer, and
padding stores every expert at the size of the fullest one (docs/mcsmoe.md has the measured sizes);
a flat block costs nothing over the kept values but 4 bytes of index per row. The residual product
runs per expert on its kept rows only: ``n_e * k_e * I`` multiply-adds instead of ``n_e * O * I``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int
from .base import ExpertBank, activation_fn
from .grouped import grouped_linear
from .inference import expert_linear
from .lowrank import LowRankSparseExperts, two_matrix_expert, two_matrix_forward
from .mlp import swiglu

__all__ = ["PackedLowRankSparseExperts"]

KINDS = ("glu", "mlp")


class PackedLowRankSparseExperts(ExpertBank):
    """A ``glu`` or ``mlp`` bank whose matrices are ``U V + S`` with only the kept rows of ``S`` stored.

    Args:
        num_experts, dim, hidden: E, D, F as in ``GLUExperts`` / ``MLPExperts``.
        kind: ``"glu"`` (``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``) or ``"mlp"``
            (``up_proj [E, F, D]``, ``down_proj [E, O, F]``, biases by default).
        rank: r; each matrix uses ``min(r, O, I)``.
        kept_rows: ``{matrix: [kept rows of S for each expert]}``; default: every row.
        activation: default ``"silu"`` (glu) / ``"gelu"`` (mlp), as the dense banks.
        out_dim, bias: mlp only, as ``MLPExperts``.

    Built directly it starts like a LoRA-initialised layer (``U = 0``, ``V`` and the kept ``S`` rows
    uniform in ``±1/sqrt(fan_in)``); ``from_masked`` packs a pruned ``LowRankSparseExperts`` exactly.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        *,
        kind: str = "glu",
        rank: int = 8,
        kept_rows: Mapping[str, Sequence[int]] | None = None,
        activation: str | None = None,
        out_dim: int | None = None,
        bias: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.kind = check_choice("kind", kind, KINDS)
        if kind == "glu" and (bias or out_dim not in (None, dim)):
            raise ValueError(f"kind='glu' has no biases and out_dim == dim, got bias={bias}, out_dim={out_dim}")
        super().__init__(num_experts, dim, out_dim)
        self.hidden = check_int("hidden", hidden, low=1)
        self.rank = check_int("rank", rank, low=1)
        self.activation = activation or ("silu" if kind == "glu" else "gelu")
        self._act = activation_fn(self.activation)
        E, D, H = self.num_experts, self.dim, self.hidden
        shapes = {"gate_up_proj": (2 * H, D), "down_proj": (D, H)} if kind == "glu" else {"up_proj": (H, D), "down_proj": (self.out_dim, H)}  # fmt: skip
        self.matrices = tuple(shapes)
        self.kept_rows = _check_kept_rows(kept_rows, shapes, E)
        #: ``(start, end)`` of each expert's kept rows in ``{m}_s`` / ``{m}_index``
        self._kept_slices = {m: list(itertools.pairwise(itertools.accumulate(c, initial=0))) for m, c in self.kept_rows.items()}
        kw = {"device": device, "dtype": dtype}
        for m, (O, I) in shapes.items():
            r, counts = min(rank, O, I), self.kept_rows[m]
            setattr(self, f"{m}_u", nn.Parameter(torch.zeros(E, O, r, **kw)))
            setattr(self, f"{m}_v", nn.Parameter(_uniform(torch.empty(E, r, I, **kw), I)))
            setattr(self, f"{m}_s", nn.Parameter(_uniform(torch.empty(sum(counts), I, **kw), I)))
            first = [e * O + torch.arange(k) for e, k in enumerate(counts)]  # placeholder layout: first k rows
            index = torch.cat(first) if first else torch.zeros(0, dtype=torch.long)
            self.register_buffer(f"{m}_index", index.to(device=device, dtype=_index_dtype(E * O)))
        if bias if bias is not None else kind == "mlp":
            self.up_bias = nn.Parameter(_uniform(torch.empty(E, H, **kw), D))
            self.down_bias = nn.Parameter(_uniform(torch.empty(E, self.out_dim, **kw), H))

    @classmethod
    def from_masked(cls, bank: LowRankSparseExperts) -> "PackedLowRankSparseExperts":
        """The same function as ``bank`` (factors, kept rows of S, biases copied; pruned rows dropped)."""
        if not isinstance(bank, LowRankSparseExperts):
            raise TypeError(f"bank must be LowRankSparseExperts, got {type(bank).__name__}")
        kept = {m: [int(c) for c in (getattr(bank, f"{m}_mask") != 0).sum(1).tolist()] for m in bank.matrices}
        w = bank.down_proj_u
        out = cls(
            bank.num_experts, bank.dim, bank.hidden, kind=bank.kind, rank=bank.rank, kept_rows=kept,
            activation=bank.activation,
            out_dim=bank.out_dim if bank.kind == "mlp" else None, bias=getattr(bank, "up_bias", None) is not None,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
        with torch.no_grad():
            for m in bank.matrices:
                getattr(out, f"{m}_u").copy_(getattr(bank, f"{m}_u"))
                getattr(out, f"{m}_v").copy_(getattr(bank, f"{m}_v"))
                index = torch.nonzero(getattr(bank, f"{m}_mask").reshape(-1) != 0).squeeze(1)
                s = getattr(bank, f"{m}_s")
                getattr(out, f"{m}_s").copy_(s.reshape(-1, s.shape[-1])[index])
                getattr(out, f"{m}_index").copy_(index)
            for b in ("up_bias", "down_bias"):
                if getattr(bank, b, None) is not None:
                    getattr(out, b).copy_(getattr(bank, b))
        return out

    def compression_layout(self) -> dict[str, Any]:
        """``{"rank": r, "kept_rows": {matrix: [kept rows per expert]}}`` (what a model config stores)."""
        return {"rank": self.rank, "kept_rows": {m: list(c) for m, c in self.kept_rows.items()}}

    # ----- weights ----------------------------------------------------------------------
    def _rows(self, m: str) -> tuple[Tensor, ...]:
        """Local row ids (in ``[0, O)``) of each expert's kept rows of matrix ``m``."""
        O = getattr(self, f"{m}_u").shape[1]
        return torch.split(getattr(self, f"{m}_index").long() % O, self.kept_rows[m])

    def residual_dense(self, m: str) -> Tensor:
        """``S`` of matrix ``m`` with the pruned rows as zeros: ``[E, O, I]``."""
        u, s = getattr(self, f"{m}_u"), getattr(self, f"{m}_s")
        E, O, I = u.shape[0], u.shape[1], s.shape[1]
        return s.new_zeros(E * O, I).index_copy(0, getattr(self, f"{m}_index").long(), s).view(E, O, I)

    def dense_weight(self, m: str) -> Tensor:
        """``U V + S`` for matrix ``m``: ``[E, O, I]``."""
        return getattr(self, f"{m}_u") @ getattr(self, f"{m}_v") + self.residual_dense(m)

    # ----- running ----------------------------------------------------------------------
    def _linear(self, x_N: Tensor, m: str, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        """``x (U V)^T`` by the factors, plus each expert's kept rows of ``S`` added into their columns."""
        low = grouped_linear(grouped_linear(x_N, params[f"{m}_v"], sizes_G), params[f"{m}_u"], sizes_G)
        sizes, counts, s = sizes_G.tolist(), self.kept_rows[m], params[f"{m}_s"]
        pieces, used = [], False
        for low_e, x_e, s_e, rows_e in zip(low.split(sizes), x_N.split(sizes), s.split(counts), self._rows(m)):
            if low_e.shape[0] and s_e.shape[0]:
                low_e, used = low_e.index_add(1, rows_e, x_e @ s_e.t()), True
            pieces.append(low_e)
        y = torch.cat(pieces) if pieces else low
        # no kept row saw a token: keep S in the graph (zero gradient), as the dense masked form does
        return y if used else y + (x_N[:0] @ s.t()).sum()

    #: the inference path runs one expert at a time (``expert_inference``) at every size
    inference_sorted_gemm = False

    def expert_inference(self, x_N: Tensor, e: int, packed: Mapping[str, Sequence[Tensor]] | None = None) -> Tensor:
        """Forward only: expert e's factors and kept rows of ``S`` read once (``r (O + I) + k_e I`` values
        per matrix instead of the dense expert's ``O I``)."""
        return two_matrix_expert(self, x_N, e)

    def _expert_linear(self, x_MI: Tensor, m: str, e: int) -> Tensor:
        """``x (U_e V_e)^T`` with expert e's kept rows of ``S`` added into their columns: ``[M, I] -> [M, O]``."""
        u = getattr(self, f"{m}_u")
        y = expert_linear(expert_linear(x_MI, getattr(self, f"{m}_v")[e]), u[e])
        start, end = self._kept_slices[m][e]
        if end > start:
            rows = getattr(self, f"{m}_index")[start:end].long() - e * u.shape[1]
            y.index_add_(1, rows, expert_linear(x_MI, getattr(self, f"{m}_s")[start:end]))
        return y

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        """Groups must be the experts (sparse dispatch, dense combine): ``sizes_G [E]``."""
        if sizes_G.numel() != self.num_experts:
            raise ValueError(
                f"a packed bank runs one group per expert (sizes_G of {self.num_experts}), got {sizes_G.numel()}"
            )
        return two_matrix_forward(self, x_N, params, sizes_G)

    def _hidden(self, h: Tensor) -> Tensor:
        if self.kind == "glu":
            if self.activation == "silu":
                return swiglu(h)
            gate, up = h.chunk(2, dim=-1)
            return self._act(gate) * up
        return self._act(h)

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        first, second = self.matrices
        up_b, down_b = getattr(self, "up_bias", None), getattr(self, "down_bias", None)
        h = F.linear(x_N, self.dense_weight(first)[e], None if up_b is None else up_b[e])
        return F.linear(self._hidden(h), self.dense_weight(second)[e], None if down_b is None else down_b[e])

    def merge_parameters(self, probs_BE: Tensor) -> dict[str, Tensor]:
        raise TypeError("a packed bank stores S per kept row, not per expert; SMEAR-style merging needs a dense bank")

    def expert_parameters(self, e: int) -> dict[str, Tensor]:
        raise TypeError("a packed bank stores S per kept row, not per expert; use dense_weight(m)[e]")

    # ----- cost -------------------------------------------------------------------------
    def flops_per_token_E(self) -> Tensor:
        """Forward FLOPs (2 per multiply-add) of each expert on one token: ``[E]``."""
        total = torch.zeros(self.num_experts, dtype=torch.float64)
        for m in self.matrices:
            u, v = getattr(self, f"{m}_u"), getattr(self, f"{m}_v")
            kept = torch.tensor(self.kept_rows[m], dtype=torch.float64)
            total += 2 * (u.shape[-1] * (u.shape[1] + v.shape[-1]) + kept * v.shape[-1])
        return total

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        for m in self.matrices:
            index = state_dict.get(f"{prefix}{m}_index")
            if index is not None and index.shape == getattr(self, f"{m}_index").shape:
                _check_index(f"{prefix}{m}_index", index, self.kept_rows[m], getattr(self, f"{m}_u").shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        kept = {m: sum(c) for m, c in self.kept_rows.items()}
        return f"{super().extra_repr()}, kind={self.kind!r}, hidden={self.hidden}, rank={self.rank}, kept_rows={kept}"


def _uniform(t: Tensor, fan_in: int) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound)


def _index_dtype(positions: int) -> torch.dtype:
    return torch.int32 if positions <= torch.iinfo(torch.int32).max else torch.int64


def _check_kept_rows(
    kept_rows: Mapping[str, Sequence[int]] | None, shapes: Mapping[str, tuple[int, int]], E: int
) -> dict[str, list[int]]:
    if kept_rows is None:
        return {m: [O] * E for m, (O, _) in shapes.items()}
    if not isinstance(kept_rows, Mapping) or set(kept_rows) != set(shapes):
        raise ValueError(f"kept_rows must map each of {list(shapes)} to {E} row counts, got {kept_rows!r}")
    out = {}
    for m, (O, _) in shapes.items():
        counts = list(kept_rows[m])
        if len(counts) != E or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= O for c in counts):
            raise ValueError(f"kept_rows[{m!r}] must be {E} ints in [0, {O}] (kept rows per expert), got {counts}")
        out[m] = counts
    return out


def _check_index(name: str, index: Tensor, counts: Sequence[int], O: int) -> None:
    idx = index.long()
    E = len(counts)
    ok = idx.numel() == 0 or bool((idx[1:] > idx[:-1]).all() and idx[0] >= 0 and idx[-1] < E * O)
    if ok and idx.numel():
        ok = torch.bincount(idx // O, minlength=E).tolist() == list(counts)
    if not ok:
        raise ValueError(
            f"{name} does not match the layout: expected strictly increasing positions e * {O} + row with "
            f"{list(counts)} rows per expert (config kept_rows); the checkpoint and its config disagree"
        )
