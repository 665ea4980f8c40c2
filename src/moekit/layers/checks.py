"""The input check every layer runs first (``MoE``, ``RemappedMoE``, ``ImageMoE``, ``SMEAR`` and the
per-example layers, ``SingleExpert``, ``ExpertParallelMoE``): one function, so that a bad input gets
the same error whatever layer it is given to."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

__all__ = ["check_layer_input", "first_tensor"]


def first_tensor(module: nn.Module) -> Tensor | None:
    """The first parameter (or buffer) of ``module``: where and in what dtype it computes."""
    return next(itertools.chain(module.parameters(), module.buffers()), None)


def check_layer_input(x: object, experts: nn.Module, *, name: str = "input") -> None:
    """``x`` must be a tensor on the experts' device and, outside autocast, in their dtype.

    Raises ``TypeError`` (not a tensor, another dtype) or ``ValueError`` (another device) naming both
    sides, before torch would fail with a "mixed dtype" or device error deep inside a kernel.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ref = first_tensor(experts)
    if ref is None:
        return
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but experts are on {ref.device}; move one of them")
    if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but experts have dtype {ref.dtype}; cast one of them")
