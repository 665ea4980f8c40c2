"""moekit's sparse dispatch as a transformers experts implementation (``ExpertsInterface``).

transformers 5 runs every registry-aware experts module (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek,
... -- classes wrapped by ``use_experts_implementation``) through the function named by
``config._experts_implementation``. This module registers two names there:

* ``"moekit"``: ``moekit.experts.dispatch`` on the module's own weights -- in training the sorted grouped
  GEMM with moekit's backward, under ``no_grad`` / ``inference_mode`` the forward-only path that streams
  each touched expert's weights once (``moekit.experts.inference``);
* ``"moekit_packed"``: the same with the expert weights also kept in oneDNN's blocked layout for
  inference on CPU (fp32/bf16; a second copy of the expert weights, rebuilt when they change).

Use::

    import moekit.integrations.hf            # registers both names (or call register_experts_implementation())
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moekit")
    model.set_experts_implementation("moekit_packed")   # at run time

Layouts: the module's flags (``is_transposed``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``) and
its own ``_apply_gate`` (e.g. GPT-OSS's interleaved, clamped SwiGLU) are honoured, so every family whose
experts the registry serves is served. Expert-parallel modules (``_is_expert_parallel``: the experts'
ids include sentinels for other ranks) fall back to the module's eager forward, with one warning.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ...experts.base import ExpertBank
from ...experts.dispatch import dispatch
from ...experts.grouped import grouped_linear
from ...experts.inference import FFNWeights, InferencePack, expert_linear
from ...types import RoutingDecision

__all__ = ["IMPLEMENTATIONS", "TransformersExperts", "moekit_experts_forward", "register_experts_implementation"]

#: the names registered in transformers' ``ExpertsInterface``
IMPLEMENTATIONS = ("moekit", "moekit_packed")


class TransformersExperts(ExpertBank):
    """An ``ExpertBank`` view of a transformers experts module: no parameters of its own, it reads the
    module's ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` (+ ``*_bias``) on every call, in
    nn.Linear layout (``[E, out, in]``; transposed storage is viewed, not copied)."""

    def __init__(self, module: nn.Module) -> None:
        self.first = "gate_up_proj" if module.has_gate else "up_proj"
        down = module.down_proj
        E, dim = down.shape[0], down.shape[2] if module.is_transposed else down.shape[1]
        super().__init__(E, dim)
        object.__setattr__(self, "module", module)  # a view, not a submodule: the weights stay the module's

    def _matrix(self, name: str) -> Tensor:
        w = getattr(self.module, name)
        return w.transpose(1, 2) if self.module.is_transposed else w

    def stacked_parameters(self) -> dict[str, Tensor]:
        out = {name: self._matrix(name) for name in (self.first, "down_proj")}
        if self.module.has_bias:
            out.update({f"{name}_bias": getattr(self.module, f"{name}_bias") for name in (self.first, "down_proj")})
        return out

    def activate(self, h: Tensor) -> Tensor:
        """The module's own gate (``_apply_gate``: ``[..., 2F] -> [..., F]``) or activation."""
        return self.module._apply_gate(h) if self.module.has_gate else self.module.act_fn(h)

    def _finish(self, y: Tensor) -> Tensor:
        return self.module.post_expert_norm(y) if self.module.has_post_expert_norm else y

    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        h = grouped_linear(x_N, params[self.first], sizes_G, params.get(f"{self.first}_bias"))
        return self._finish(grouped_linear(self.activate(h), params["down_proj"], sizes_G, params.get("down_proj_bias")))

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        p = self.stacked_parameters()
        b1, b2 = p.get(f"{self.first}_bias"), p.get("down_proj_bias")
        h = torch.nn.functional.linear(x_N, p[self.first][e], None if b1 is None else b1[e])
        return self._finish(torch.nn.functional.linear(self.activate(h), p["down_proj"][e], None if b2 is None else b2[e]))

    def expert_inference(self, x_N: Tensor, e: int, packed: Mapping[str, Sequence[Tensor]] | None = None) -> Tensor:
        p = self.stacked_parameters()
        b1, b2 = p.get(f"{self.first}_bias"), p.get("down_proj_bias")
        w1, w2 = (None, None) if packed is None else (packed[self.first][e], packed["down_proj"][e])
        h = expert_linear(x_N, p[self.first][e], None if b1 is None else b1[e], packed=w1, act_fn=self.activate,
                          glu=self.module.has_gate)  # fmt: skip
        return self._finish(expert_linear(h, p["down_proj"][e], None if b2 is None else b2[e], packed=w2))

    def inference_matrices(self) -> dict[str, list[Tensor]]:
        return {name: list(self._matrix(name).unbind(0)) for name in (self.first, "down_proj")}

    def ffn_weights(self) -> FFNWeights | None:
        """The module's matrices when its experts are a plain two-matrix FFN: concatenated ``[gate; up]``
        with transformers' default gate (or no gate), a standard activation, no post-expert norm; None
        otherwise (e.g. GPT-OSS's interleaved, clamped SwiGLU)."""
        from transformers.integrations import moe

        module = self.module
        default_gate = type(module)._apply_gate is moe._default_apply_gate and getattr(module, "is_concatenated", True)
        if module.has_post_expert_norm or (module.has_gate and not default_gate):
            return None
        activation = _activation_name(getattr(module, "act_fn", None))
        if activation is None:
            return None
        p = self.stacked_parameters()
        return FFNWeights(p[self.first], p["down_proj"], p.get(f"{self.first}_bias"), p.get("down_proj_bias"),
                          glu=module.has_gate, activation=activation)  # fmt: skip


def _activation_name(act: nn.Module | None) -> str | None:
    """moekit's name of a transformers activation module (``ACT2FN``) where it is one of the exact
    standard ones (silu, gelu with erf or tanh, relu), else None."""
    from transformers import activations

    if isinstance(act, (nn.SiLU, activations.SiLUActivation)):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, (activations.GELUActivation, activations.GELUTanh)):
        fn = getattr(act, "act", None)
        if fn is torch.nn.functional.gelu:
            return "gelu"
        if getattr(fn, "func", None) is torch.nn.functional.gelu and getattr(fn, "keywords", {}) == {"approximate": "tanh"}:
            return "gelu_tanh"
    return None


def _bank(module: nn.Module, packed: bool) -> TransformersExperts:
    """The module's cached view, with packing switched to ``packed``."""
    bank = module.__dict__.get("_moekit_bank")
    if bank is None:
        bank = TransformersExperts(module)
        object.__setattr__(module, "_moekit_bank", bank)
    if packed and bank._inference_pack is None:
        bank._inference_pack = InferencePack()
    elif not packed:
        bank._inference_pack = None  # switching back frees the packed copy
    return bank


def _forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, packed: bool) -> Tensor:
    if getattr(module, "_is_expert_parallel", False):
        warnings.warn(f"{type(module).__name__} is expert-parallel: the moekit experts implementation serves "
                      "single-process experts only; running the module's eager forward", stacklevel=3)  # fmt: skip
        return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)
    bank = _bank(module, packed)
    dtype = bank.stacked_parameters()["down_proj"].dtype
    decision = RoutingDecision(top_k_index.long(), top_k_weights, bank.num_experts)
    return dispatch(bank, hidden_states.to(dtype), decision).to(hidden_states.dtype)


def moekit_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers experts forward: ``hidden_states [T, H]``, ``top_k_index [T, K]``, ``top_k_weights
    [T, K]`` -> ``[T, H]``, by ``moekit.experts.dispatch``."""
    return _forward(self, hidden_states, top_k_index, top_k_weights, packed=False)


def moekit_packed_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """As ``moekit_experts_forward``, with oneDNN-packed expert weights for inference on CPU."""
    return _forward(self, hidden_states, top_k_index, top_k_weights, packed=True)


def register_experts_implementation() -> tuple[str, ...]:
    """Register ``"moekit"`` and ``"moekit_packed"`` in transformers' ``ExpertsInterface`` (global, idempotent);
    returns the names. Importing ``moekit.integrations.hf`` calls it."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("moekit", moekit_experts_forward)
    ExpertsInterface.register("moekit_packed", moekit_packed_experts_forward)
    return IMPLEMENTATIONS
