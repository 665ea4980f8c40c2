"""Two-layer MLP experts and gated (SwiGLU) experts, parameters in nn.Linear layout ``[E, out, in]``.

The gated bank uses the fused ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]`` layout of
Hugging Face MoE models (Mixtral, Qwen2-MoE, OLMoE in transformers 5.x), so weights move between
the two without reshuffling.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._checks import check_int
from ..registry import EXPERTS
from .base import ExpertBank, activation_fn, init_stacked_linear
from .grouped import grouped_linear
from .inference import FFNWeights, expert_linear
from .merged_linear import merged_linear

__all__ = ["MLPExperts", "GLUExperts", "swiglu"]


@EXPERTS.register("mlp", paper="https://arxiv.org/abs/1701.06538")
class MLPExperts(ExpertBank):
    """E two-layer MLPs: ``down(act(up(x)))`` with ``up_proj [E, F, D]``, ``down_proj [E, D, F]``."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        *,
        out_dim: int | None = None,
        activation: str = "gelu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, dim, out_dim)
        self.hidden = check_int("hidden", hidden, low=1)
        self.activation = activation
        self._act = activation_fn(activation)
        kw = {"device": device, "dtype": dtype}
        E, D, F_, O = self.num_experts, self.dim, self.hidden, self.out_dim
        self.up_proj = nn.Parameter(torch.empty(E, F_, D, **kw))
        self.down_proj = nn.Parameter(torch.empty(E, O, F_, **kw))
        self.up_bias = nn.Parameter(torch.empty(E, F_, **kw)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, O, **kw)) if bias else None
        init_stacked_linear(self.up_proj, self.up_bias)
        init_stacked_linear(self.down_proj, self.down_bias)

    def activate(self, h: Tensor) -> Tensor:
        """The hidden activation, ``[..., F] -> [..., F]``."""
        return self._act(h)

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        h = self.activate(grouped_linear(x_N, params["up_proj"], sizes_G, params.get("up_bias")))
        return grouped_linear(h, params["down_proj"], sizes_G, params.get("down_bias"))

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        up_b = None if self.up_bias is None else self.up_bias[e]
        down_b = None if self.down_bias is None else self.down_bias[e]
        return F.linear(self.activate(F.linear(x_N, self.up_proj[e], up_b)), self.down_proj[e], down_b)

    def expert_inference(self, x_N: Tensor, e: int, packed: Mapping[str, Sequence[Tensor]] | None = None) -> Tensor:
        up_b = None if self.up_bias is None else self.up_bias[e]
        down_b = None if self.down_bias is None else self.down_bias[e]
        up, down = (None, None) if packed is None else (packed["up_proj"][e], packed["down_proj"][e])
        h = expert_linear(x_N, self.up_proj[e], up_b, packed=up, activation=self.activation, act_fn=self.activate)
        return expert_linear(h, self.down_proj[e], down_b, packed=down)

    def inference_matrices(self) -> dict[str, list[Tensor]]:
        return {"up_proj": list(self.up_proj.unbind(0)), "down_proj": list(self.down_proj.unbind(0))}

    def ffn_weights(self) -> FFNWeights:
        return FFNWeights(self.up_proj, self.down_proj, self.up_bias, self.down_bias, glu=False, activation=self.activation)

    def forward_merged(self, x_GSI: Tensor, probs_GE: Tensor, *, chunk_bytes: int) -> Tensor:
        h = self.activate(merged_linear(x_GSI, probs_GE, self.up_proj, self.up_bias, chunk_bytes=chunk_bytes))
        return merged_linear(h, probs_GE, self.down_proj, self.down_bias, chunk_bytes=chunk_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}, activation={self.activation!r}"


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of a fused ``[N, 2F]`` projection (gate columns first).

    Autograd of ``chunk -> silu -> mul`` ends in a ``cat`` of the two half-gradients; this backward
    writes both halves straight into one ``[N, 2F]`` buffer (one pass and one allocation fewer).
    """

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:  # type: ignore[override]
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor) -> Tensor:  # type: ignore[override]
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_h, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        torch.mul(grad_h, act, out=grad_up)
        return grad


def swiglu(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim: ``[..., 2F] -> [..., F]``.
    Under ``torch.compile`` the plain ops (the compiler fuses them; the hand-written backward writes into
    views, which it cannot trace)."""
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)


@EXPERTS.register("glu", paper="https://arxiv.org/abs/2002.05202")
class GLUExperts(ExpertBank):
    """E gated MLPs (SwiGLU by default): ``down(act(gate(x)) * up(x))``.

    ``gate_up_proj [E, 2F, D]`` holds the gate rows first, then the up rows (Hugging Face layout).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        *,
        activation: str = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, dim)
        self.hidden = check_int("hidden", hidden, low=1)
        self.activation = activation
        self._act = activation_fn(activation)
        kw = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.hidden, self.dim, **kw))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.dim, self.hidden, **kw))
        init_stacked_linear(self.gate_up_proj)
        init_stacked_linear(self.down_proj)

    def glu_reference(self, gate_up: Tensor) -> Tensor:
        """Plain ``act(gate) * up`` of ``[gate | up]``: ``[..., 2F] -> [..., F]`` (the reference)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self._act(gate) * up

    def activate(self, gate_up: Tensor) -> Tensor:
        """``act(gate) * up`` of ``[gate | up]``, ``[..., 2F] -> [..., F]``; SiLU with the fused backward."""
        return swiglu(gate_up) if self.activation == "silu" else self.glu_reference(gate_up)

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        gate_up = grouped_linear(x_N, params["gate_up_proj"], sizes_G)
        return grouped_linear(self.activate(gate_up), params["down_proj"], sizes_G)

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        return F.linear(self.glu_reference(F.linear(x_N, self.gate_up_proj[e])), self.down_proj[e])

    def expert_inference(self, x_N: Tensor, e: int, packed: Mapping[str, Sequence[Tensor]] | None = None) -> Tensor:
        gate_up, down = (None, None) if packed is None else (packed["gate_up_proj"][e], packed["down_proj"][e])
        h = expert_linear(x_N, self.gate_up_proj[e], packed=gate_up, activation=self.activation, act_fn=self.activate, glu=True)
        return expert_linear(h, self.down_proj[e], packed=down)

    def inference_matrices(self) -> dict[str, list[Tensor]]:
        return {"gate_up_proj": list(self.gate_up_proj.unbind(0)), "down_proj": list(self.down_proj.unbind(0))}

    def ffn_weights(self) -> FFNWeights:
        return FFNWeights(self.gate_up_proj, self.down_proj, glu=True, activation=self.activation)

    def forward_merged(self, x_GSI: Tensor, probs_GE: Tensor, *, chunk_bytes: int) -> Tensor:
        h = self.activate(merged_linear(x_GSI, probs_GE, self.gate_up_proj, chunk_bytes=chunk_bytes))
        return merged_linear(h, probs_GE, self.down_proj, chunk_bytes=chunk_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}, activation={self.activation!r}"
