"""Argument checks that raise ValueError/TypeError naming the argument, the value and what is allowed."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number ``> 0`` (``>= 0`` with ``allow_zero``); NaN and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        allowed = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_k(k: Any, num_experts: int) -> int:
    check_int("k", k, low=1)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got k={k}")
    return k


def check_last_dim(name: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension {dim}, got shape {tuple(x.shape)}")


def check_same_device_dtype(name: str, x: Tensor, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; move them to one device")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; cast one of them")


def check_finite(logits: Tensor, where: str) -> None:
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).sum().item()
        raise FloatingPointError(
            f"non-finite router logits in {where}: {bad} of {logits.numel()} values are NaN/inf "
            "(pass check_finite=False to skip this check)"
        )


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def raise_for_tensor_problems(
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, Sequence[int], Sequence[int]]] = (),
    where: str,
    against: str = "the model",
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected and mismatched tensor (name, shape found,
    shape expected) of the weights ``where`` (a file or directory) compared with ``against``; nothing
    when all lists are empty."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted((k, list(a), list(b)) for k, a, b in mismatched)
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{k} (found {a}, expected {b})" for k, a, b in mismatched]
        problems.append(f"tensors of another shape {_listed(shapes)}")
    if problems:
        raise ValueError(f"the weights in {where!r} do not match {against}: " + "; ".join(problems))


def check_tensor_names(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], *, where: str,
    against: str = "the model",
) -> None:  # fmt: skip
    """Compare tensor names and shapes before anything is allocated: ``expected`` (e.g. the model's
    ``state_dict`` built on the meta device) against ``found`` (e.g. a safetensors header, read with
    ``safe_open``). Raises ``ValueError`` naming the missing, unexpected and mismatched tensors."""
    common = sorted(expected.keys() & found.keys())
    raise_for_tensor_problems(
        missing=expected.keys() - found.keys(),
        unexpected=found.keys() - expected.keys(),
        mismatched=[(k, found[k], expected[k]) for k in common if list(found[k]) != list(expected[k])],
        where=where,
        against=against,
    )


def check_tensor_dtypes(found: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, where: str) -> None:
    """Raise ``TypeError`` naming the tensors of ``found`` whose kind differs from ``expected``: a float
    tensor for an integer buffer or the reverse (``load_state_dict`` would cast it silently), or
    another integer/bool dtype. Float precisions may differ (they are cast, as ``load_state_dict`` does)."""
    bad = []
    for key in sorted(found.keys() & expected.keys()):
        a, b = found[key], expected[key]
        if a.is_floating_point() != b.is_floating_point() or (not a.is_floating_point() and a.dtype != b.dtype):
            bad.append(f"{key} ({str(a.dtype).removeprefix('torch.')}, expected {str(b.dtype).removeprefix('torch.')})")
    if bad:
        raise TypeError(f"the weights in {where!r} have tensors of the wrong dtype: {_listed(bad)}")


def check_finite_tensors(named: Iterable[tuple[str, Tensor]], *, where: str) -> None:
    """Raise ``ValueError`` naming the floating-point tensors that hold NaN or inf values."""
    bad = [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"the weights in {where!r} hold NaN/inf values in tensors {_listed(bad)}")
