"""The *features* seam of ``MoE``: what a router sees, and which rows of the input share a decision.

``MoE.forward`` is ``x -> features -> router -> RoutingDecision -> dispatcher(bank) -> MoEOutput``. A
features part turns the layer input into a ``RoutedInput``: the rows the bank runs (``x_N``), the
router's input with one row per *routing group* (``route_in_GD``), how many consecutive rows each
group spans (``sizes_G``, ``None`` when every row is its own group), the metadata per group, and how
to put the output back into the input's shape.

* ``TokenFeatures`` -- one decision per token ``[..., D]``, or per image ``[N, C, H, W]`` for image
  banks (the router sees the bank's ``router_features``, global average pooling, or the layer's
  ``gate``: GAP-FC / conv gate of MoE in CNNs, https://arxiv.org/abs/2204.10598).
* ``ExampleFeatures`` -- one decision per example, routed on the masked mean of its positions (SMEAR,
  https://arxiv.org/abs/2306.03745), or per causal segment (``segment_len``, Lory,
  https://arxiv.org/abs/2405.03133, ``segments.py``); images route whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..experts.base import ExpertBank
from .pooling import RoutingGroups, example_groups
from .segments import FIRST_SEGMENT, causal_segment_groups

__all__ = ["RoutedInput", "Features", "TokenFeatures", "ExampleFeatures", "flatten_meta", "group_meta"]


@dataclass(frozen=True)
class RoutedInput:
    """What a features part hands to the router and the dispatcher.

    Attributes:
        x_N: the rows the bank runs, ``[N, D]`` (or ``[N, C, H, W]``).
        route_in_GD: the router's input, one row per routing group ``[G, D_r]``.
        sizes_G: rows of ``x_N`` per group (consecutive), int64 ``[G]``; ``None``: one row per group (G = N).
        meta: metadata with one value per group (or ``None``).
        stop_grad_G: bool ``[G]``, groups whose routing weights get a stop-gradient, or ``None``.
        restore: maps the bank's output ``[N, out]`` back to the input's shape.
    """

    x_N: Tensor
    route_in_GD: Tensor
    sizes_G: Tensor | None
    meta: dict[str, Any] | None
    stop_grad_G: Tensor | None
    restore: Callable[[Tensor], Tensor]


class Features:
    """Base of the features parts: ``features(x, mask, meta, experts, gate) -> RoutedInput``."""

    #: short name shown in the layer's repr
    name = "features"

    def check(self, experts: ExpertBank, gate: nn.Module | None) -> None:
        """Raise when this part cannot serve ``experts`` (called once, when the layer is built)."""

    def __call__(self, x: Tensor, mask: Tensor | None, meta: Mapping[str, Any] | None, experts: ExpertBank,
                 gate: nn.Module | None) -> RoutedInput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def flatten_meta(meta: Mapping[str, Any] | None, lead_shape: torch.Size) -> dict[str, Any] | None:
    """Bring per-example or per-token metadata to one value per token.

    A tensor whose shape is ``lead_shape`` (per token) or a prefix of it (per example) is broadcast
    and flattened to ``[T]``; other values pass through unchanged.
    """
    if meta is None:
        return None
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            n = value.dim()
            if tuple(value.shape) != tuple(lead_shape[:n]):
                raise ValueError(
                    f"meta[{key!r}] has shape {tuple(value.shape)}; expected the input's leading shape "
                    f"{tuple(lead_shape)} or a prefix of it"
                )
            value = value.reshape(*value.shape, *([1] * (len(lead_shape) - n))).expand(*lead_shape).reshape(-1)
        out[key] = value
    return out


def group_meta(meta: Mapping[str, Any] | None, batch: int, example_G: Tensor) -> dict[str, Any] | None:
    """Per-example metadata (tensors ``[B]``) expanded to one value per routing group."""
    if meta is None:
        return None
    expand = example_G.shape[0] != batch
    out = {}
    for key, value in meta.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            if value.shape[0] != batch:
                raise ValueError(f"meta[{key!r}] has {value.shape[0]} entries but the batch has {batch} examples")
            if expand:
                value = value[example_G.to(value.device)]
        out[key] = value
    return out


class TokenFeatures(Features):
    """One routing decision per token (per image for image banks); ``mask`` is not used here."""

    name = "token"

    def __call__(self, x: Tensor, mask: Tensor | None, meta: Mapping[str, Any] | None, experts: ExpertBank,
                 gate: nn.Module | None) -> RoutedInput:
        if mask is not None:
            raise ValueError("mask is for per-example routing (ExampleRoutedMoE, SMEAR); this layer routes per token")
        x_T = experts.as_tokens(x)
        lead = x.shape[:-1] if experts.token_input else x.shape[:1]
        route_in = experts.router_features(x_T) if gate is None else gate(x_T)
        return RoutedInput(x_T, route_in, None, flatten_meta(meta, lead), None, lambda y_T: experts.restore(y_T, x))


class ExampleFeatures(Features):
    """One routing decision per example (masked mean over positions) or per causal segment.

    Args:
        segment_len: route causal segments of this many positions instead of whole examples (Lory).
        first_segment: ``"self"`` or ``"default"``, see ``moekit.layers.segments``.

    Input: ``[B, S, D]`` sequences (optional padding ``mask [B, S]``, true = real token), ``[B, D]``
    vectors, or ``[B, C, H, W]`` images for image banks. Groups are examples, or (example, segment) in
    that order; ``meta`` holds per-example values (``[B]``).
    """

    name = "example"

    def __init__(self, segment_len: int | None = None, first_segment: str = "self") -> None:
        if segment_len is not None:
            check_int("segment_len", segment_len, low=1)
        self.segment_len = segment_len
        self.first_segment = check_choice("first_segment", first_segment, FIRST_SEGMENT)

    def check(self, experts: ExpertBank, gate: nn.Module | None) -> None:
        if self.segment_len is not None and not experts.token_input:
            raise ValueError(f"segment_len needs a token expert bank (adapter, mlp, glu), got {type(experts).__name__}")
        if gate is not None:
            raise ValueError("per-example routing pools the input itself; a gate module goes with TokenFeatures")

    def __call__(self, x: Tensor, mask: Tensor | None, meta: Mapping[str, Any] | None, experts: ExpertBank,
                 gate: nn.Module | None) -> RoutedInput:
        x_BS, restore = self._as_sequences(x, experts)
        groups = self.groups(x_BS, mask, experts)
        x_N = x_BS.reshape(-1, *x_BS.shape[2:])
        return RoutedInput(x_N, groups.route_in_GD, groups.sizes_G, group_meta(meta, x_BS.shape[0], groups.example_G),
                           groups.stop_grad_G, restore)  # fmt: skip

    def groups(self, x_BS: Tensor, mask: Tensor | None, experts: ExpertBank) -> RoutingGroups:
        """The routing groups of ``[B, S, ...]``: examples, or causal segments when ``segment_len`` is set."""
        if not experts.token_input:  # images: one group per image, routed on its pooled features
            if mask is not None:
                raise ValueError("mask is for sequences [B, S, D]; conv expert banks route whole images")
            B = x_BS.shape[0]
            ones = torch.ones(B, dtype=torch.long, device=x_BS.device)
            return RoutingGroups(experts.router_features(x_BS[:, 0]), ones, torch.arange(B, device=x_BS.device))
        if self.segment_len is not None:
            return causal_segment_groups(x_BS, mask, self.segment_len, self.first_segment)
        return example_groups(x_BS, mask)

    def _as_sequences(self, x: Tensor, experts: ExpertBank) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """View the input as ``[B, S, ...]`` and return a function restoring the output's shape."""
        if x.dim() > 0 and x.shape[0] == 0:
            raise ValueError(f"input has an empty batch: shape {tuple(x.shape)}")
        if not experts.token_input:
            experts.as_tokens(x)  # validates [N, C, H, W]
            return x.unsqueeze(1), lambda y: y
        D = experts.dim
        if x.dim() not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"input must be [B, S, {D}] or [B, {D}], got shape {tuple(x.shape)}")
        if x.dim() == 2:
            if self.segment_len is not None:
                raise ValueError(f"causal segment routing needs sequences [B, L, {D}], got shape {tuple(x.shape)}")
            return x.unsqueeze(1), lambda y: y.reshape(x.shape[0], -1)
        return x, lambda y: y.reshape(x.shape[0], x.shape[1], -1)

    def extra_repr(self) -> str:
        if self.segment_len is None:
            return ""
        return f"segment_len={self.segment_len}, first_segment={self.first_segment!r}"
