"""A small decoder-only MoE transformer language model over bytes (nanoGPT-style, MoE FFN).

``tokens [B, S] -> embed + position -> [x + attn(norm x); x + MoE(norm x)] x depth -> norm -> head``.
Attention is causal multi-head (``scaled_dot_product_attention``); every FFN is a moekit ``MoE``
(``"glu"`` or ``"mlp"`` bank, registry router, default top-2). After expert merging a layer may be a
``RemappedMoE`` (router with more outputs than experts, exact merged form) or a smaller ``MoE``
(plain form), and after MC-SMoE compression a layer's bank may be low-rank + sparse (dense-masked
``LowRankSparseExperts`` or ``PackedLowRankSparseExperts``); ``config()`` describes the model as it
is, so checkpoints rebuild merged and compressed models.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..experts.lowrank import LowRankSparseExperts
from ..experts.packed import PackedLowRankSparseExperts
from ..layers.moe import MoE
from ..layers.remap import RemappedMoE
from ..registry import EXPERTS, MODELS, ROUTERS
from ..training import lm_loss
from ..types import MoEOutput

__all__ = ["MoELM", "CausalSelfAttention", "lm_loss"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``[B, S, D] -> [B, S, D]``."""

    def __init__(self, dim: int, heads: int, *, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, moe: nn.Module, **kw: Any) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, **kw)
        self.attn = CausalSelfAttention(dim, heads, **kw)
        self.norm2 = nn.RMSNorm(dim, **kw)
        self.moe = moe

    def forward(self, x: Tensor) -> tuple[Tensor, MoEOutput]:
        x = x + self.attn(self.norm1(x))
        out = self.moe(self.norm2(x))
        return x + out.y, out


@MODELS.register("moe_lm", summary="decoder-only MoE transformer language model (byte level by default)")
class MoELM(nn.Module):
    """Decoder-only MoE language model.

    Args:
        vocab_size: 256 for bytes.
        dim, depth, heads, max_seq_len: transformer sizes.
        num_experts, k, hidden, experts, activation: the MoE FFN (E experts, top-k, hidden F, bank name).
        router, router_kwargs: registry router (default ``"topk"`` without noise).
        experts_per_layer: experts in each layer's bank (after merging); default E everywhere.
        router_outputs_per_layer: router outputs per layer; where it exceeds the layer's experts the
            layer is a ``RemappedMoE`` (exact merged form). Default: equal to ``experts_per_layer``.
        compressed: per layer ``None`` (dense bank) or a compressed bank's ``compression_layout()``:
            ``{"rank": r, "kept_rows": {matrix: [kept residual rows per expert]}}`` builds a
            ``PackedLowRankSparseExperts``, ``{"rank": r, "kept_rows": None}`` a dense-masked
            ``LowRankSparseExperts`` (``moekit.merging``). Default: no layer compressed.

    ``forward(tokens [B, S]) -> (logits [B, S, V], [MoEOutput per layer])``.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        max_seq_len: int = 256,
        num_experts: int = 8,
        k: int = 2,
        hidden: int = 256,
        experts: str = "glu",
        activation: str = "silu",
        router: str = "topk",
        router_kwargs: Mapping[str, Any] | None = None,
        experts_per_layer: Sequence[int] | None = None,
        router_outputs_per_layer: Sequence[int] | None = None,
        compressed: Sequence[Mapping[str, Any] | None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.depth = check_int("depth", depth, low=1)
        check_int("num_experts", num_experts, low=1)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=1)
        bank_sizes = list(experts_per_layer or [num_experts] * depth)
        router_sizes = list(router_outputs_per_layer or bank_sizes)
        for name, sizes in (("experts_per_layer", bank_sizes), ("router_outputs_per_layer", router_sizes)):
            if len(sizes) != depth or any(not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"{name} must be {depth} ints >= 1, got {sizes}")
        layouts = list(compressed) if compressed is not None else [None] * depth
        if len(layouts) != depth:
            raise ValueError(f"compressed must have one entry per layer ({depth}), got {len(layouts)}")
        router_kwargs = {"noisy": False, **(router_kwargs or {})} if router == "topk" else dict(router_kwargs or {})
        self._spec = {
            "vocab_size": vocab_size, "dim": dim, "depth": depth, "heads": heads, "max_seq_len": max_seq_len,
            "num_experts": num_experts, "k": k, "hidden": hidden, "experts": experts, "activation": activation,
            "router": router, "router_kwargs": router_kwargs,
        }  # fmt: skip
        self.embed = nn.Embedding(check_int("vocab_size", vocab_size, low=1), dim, **kw)
        self.pos = nn.Embedding(max_seq_len, dim, **kw)
        blocks = []
        for i, (G, R, layout) in enumerate(zip(bank_sizes, router_sizes, layouts)):
            if G > R:
                raise ValueError(f"a layer cannot have more experts ({G}) than router outputs ({R})")
            gate = ROUTERS.create(router, dim=dim, num_experts=R, k=min(k, R), **router_kwargs, **kw)
            bank_kw = {"num_experts": G, "dim": dim, "hidden": hidden, "activation": activation, **kw}
            bank = _bank(experts, bank_kw, layout, f"compressed[{i}]")
            moe = MoE(gate, bank) if G == R else RemappedMoE(gate, bank, torch.arange(R, device="cpu") % G)
            blocks.append(_Block(dim, heads, moe, **kw))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim, **kw)
        self.head = nn.Linear(dim, vocab_size, bias=False, **kw)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith(("embed.weight", "pos.weight")):
                nn.init.normal_(p, std=0.02)
        for block in self.blocks:  # GPT-2 style: residual output projections scaled by depth
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.depth))

    def moe_layers(self) -> dict[str, nn.Module]:
        """``{module name: MoE or RemappedMoE}`` in depth order."""
        return {f"blocks.{i}.moe": block.moe for i, block in enumerate(self.blocks)}

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model as it is now (merged layers included)."""
        banks = [block.moe.experts.num_experts for block in self.blocks]
        routers = [block.moe.router.num_experts for block in self.blocks]
        out = {**self._spec, "experts_per_layer": banks, "router_outputs_per_layer": routers}
        layouts = [_layout(block.moe.experts) for block in self.blocks]
        if any(layout is not None for layout in layouts):
            out["compressed"] = layouts
        return out

    def embed_tokens(self, tokens_BS: Tensor) -> Tensor:
        """Token plus position embeddings, the input of the first block: ``[B, S, D]``."""
        if tokens_BS.dim() != 2 or tokens_BS.shape[1] > self.max_seq_len:
            raise ValueError(f"tokens must be [B, S<={self.max_seq_len}], got {tuple(tokens_BS.shape)}")
        pos = torch.arange(tokens_BS.shape[1], device=tokens_BS.device)
        return self.embed(tokens_BS) + self.pos(pos)

    def output_logits(self, x_BSD: Tensor) -> Tensor:
        """Logits from the last block's output: ``[B, S, V]``."""
        return self.head(self.norm(x_BSD))

    def forward(self, tokens_BS: Tensor) -> tuple[Tensor, list[MoEOutput]]:
        x = self.embed_tokens(tokens_BS)
        outputs = []
        for block in self.blocks:
            x, out = block(x)
            outputs.append(out)
        return self.output_logits(x), outputs


def _layout(bank: nn.Module) -> dict[str, Any] | None:
    describe = getattr(bank, "compression_layout", None)
    return describe() if callable(describe) else None


def _bank(experts: str, bank_kw: dict[str, Any], layout: Mapping[str, Any] | None, where: str) -> nn.Module:
    """A dense registry bank, or the compressed bank ``layout`` describes (see ``MoELM``'s ``compressed``)."""
    if layout is None:
        return EXPERTS.create(experts, **bank_kw)
    if not isinstance(layout, Mapping) or set(layout) != {"rank", "kept_rows"}:
        raise ValueError(f"{where} must be None or {{'rank': int, 'kept_rows': ...}}, got {layout!r}")
    if experts not in ("glu", "mlp"):
        raise ValueError(f"{where}: compressed layers need experts 'glu' or 'mlp', got {experts!r}")
    try:
        if layout["kept_rows"] is None:
            return LowRankSparseExperts(EXPERTS.create(experts, **bank_kw), layout["rank"])
        return PackedLowRankSparseExperts(kind=experts, rank=layout["rank"], kept_rows=layout["kept_rows"], **bank_kw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
