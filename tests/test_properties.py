"""Property test: every registered router with every registered expert bank, on random inputs.

Hypothesis draws the router and bank (``moekit.registry`` ROUTERS x EXPERTS, including entries that
other parts of moekit register later), widths, expert counts, ``k``, the dtype (fp32, bf16, fp64),
the batch (empty, one token, a few; flat or with extra leading dims), non-contiguous inputs, input
scale, train/eval mode and the combine mode. For every draw the layer either

* returns an output of the input's shape (token banks; ``[N, C_out, H, W]`` for conv banks) in the
  input's dtype, finite, with finite input gradients in training, or
* refuses with a moekit error: a ``ValueError`` / ``TypeError`` / ``FloatingPointError`` raised by
  moekit's own code (the innermost frame lies in ``src/moekit``), with a message that names something;

never a raw torch error from deep inside a kernel. fp32 and fp64 must never be refused (only bf16
may be, by a clear moekit error) so that a router refusing everything cannot pass.
"""

from __future__ import annotations

import inspect
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import moekit
from moekit.registry import EXPERTS, ROUTERS

MOEKIT_SRC = Path(moekit.__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
MOEKIT_ERRORS = (ValueError, TypeError, FloatingPointError)
NUM_KEYS = 7  # hash routers' key range


def _router_kwargs(name: str, dim: int, num_experts: int, k: int, dtype: torch.dtype) -> dict:
    factory = ROUTERS.get(name)
    params = inspect.signature(factory).parameters
    kwargs: dict = {"dim": dim, "num_experts": num_experts, "dtype": dtype}
    if "k" in params:
        kwargs["k"] = k
    if "num_keys" in params:
        kwargs["num_keys"] = NUM_KEYS
    return kwargs


def _meta(name: str, lead: tuple[int, ...], num_experts: int, gen: torch.Generator) -> dict | None:
    """The metadata a router reads (hash keys, tags; one value per token), or None."""
    params = inspect.signature(ROUTERS.get(name)).parameters
    if "num_keys" in params:
        return {"token_ids": torch.randint(0, NUM_KEYS, lead, generator=gen)}
    if "num_tags" in params or "mapping" in params:
        return {"tag": torch.randint(0, num_experts, lead, generator=gen)}
    return None


def _bank(name: str, num_experts: int, dim: int, hidden: int, dtype: torch.dtype) -> moekit.ExpertBank:
    factory = EXPERTS.get(name)
    params = inspect.signature(factory).parameters
    size = next(p for p in ("hidden", "bottleneck", "out_channels") if p in params)
    first = "in_channels" if "in_channels" in params else "dim"
    return factory(num_experts=num_experts, **{first: dim, size: hidden}, dtype=dtype)


def _noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` laid out with strides (a transposed copy, transposed back)."""
    if x.dim() < 2:
        return x.expand(2, *x.shape)[0]  # stride 0 along nothing: a view of a broadcast
    y = x.transpose(0, -1).contiguous().transpose(0, -1)
    assert not y.is_contiguous() or y.numel() <= 1 or min(y.shape) == 1
    return y


def _assert_moekit_error(err: BaseException, case: str) -> None:
    """``err`` is one of moekit's errors, raised by moekit's code, with a message."""
    assert isinstance(err, MOEKIT_ERRORS), f"{case}: raw {type(err).__name__}: {err}"
    frames = traceback.extract_tb(err.__traceback__)
    origin = Path(frames[-1].filename).resolve()
    assert MOEKIT_SRC in origin.parents, (
        f"{case}: {type(err).__name__} raised by {origin}:{frames[-1].lineno}, not by moekit: {err}"
    )
    assert len(str(err)) > 15, f"{case}: unclear message {str(err)!r}"


@st.composite
def cases(draw: st.DrawFn) -> dict:
    num_experts = draw(st.integers(2, 6))
    bank = draw(st.sampled_from(EXPERTS.names()))
    conv = bank == "conv"
    return {
        "router": draw(st.sampled_from(ROUTERS.names())),
        "bank": bank,
        "num_experts": num_experts,
        "k": draw(st.integers(1, num_experts)),
        "dim": draw(st.integers(1, 4 if conv else 12)),
        "hidden": draw(st.integers(1, 8)),
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "input_dtype": draw(st.sampled_from([None, None, None, *DTYPES])),  # None: the layer's dtype
        "tokens": draw(st.sampled_from([0, 1, 2, 3, 5, 9, 16])),
        "extra_lead": draw(st.sampled_from([(), (2,)])) if not conv else (),
        "image": draw(st.integers(1, 5)) if conv else 0,
        "noncontiguous": draw(st.booleans()),
        "scale": draw(st.sampled_from([1e-3, 1.0, 30.0])),
        "training": draw(st.booleans()),
        "combine": draw(st.sampled_from(["sparse", "dense"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _case(router: str, bank: str, **changes: object) -> dict:
    base = {"router": router, "bank": bank, "num_experts": 3, "k": 2, "dim": 3, "hidden": 4, "dtype": "fp32",
            "input_dtype": None, "tokens": 0, "extra_lead": (), "image": 2 if bank == "conv" else 0,
            "noncontiguous": False, "scale": 1.0, "training": True, "combine": "sparse", "seed": 0}
    return {**base, **changes}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
# what the property found (each failed before its fix):
@example(case=_case("hash", "conv"))  # no image, router without x-gradient: output off the autograd graph
@example(case=_case("latent_skills", "conv"))  # same: x.grad missing
@example(case=_case("comet", "mlp", training=False))  # aux entropy_reg NaN on an empty batch
@example(case=_case("dselect", "glu"))  # same
@example(case=_case("reinforce", "mlp", dtype="bf16", tokens=5))  # bf16 baseline fed fp32: raw dtype error
@example(case=_case("reinforce", "adapter", dtype="fp64", tokens=1))  # same in fp64
@example(case=_case("topk", "mlp", input_dtype="fp64", tokens=4))  # an input of another dtype: moekit's TypeError
def test_every_router_and_bank_give_finite_outputs_or_a_moekit_error(case: dict) -> None:
    dtype = DTYPES[case["dtype"]]
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    E, D, T = case["num_experts"], case["dim"], case["tokens"]
    try:
        router = ROUTERS.get(case["router"])(**_router_kwargs(case["router"], D, E, case["k"], dtype))
        bank = _bank(case["bank"], E, D, case["hidden"], dtype)
        layer = moekit.MoE(router, bank, combine=case["combine"]).train(case["training"])
    except MOEKIT_ERRORS as err:
        _assert_moekit_error(err, str(case))
        assert case["dtype"] == "bf16", f"{case}: refused at construction in {case['dtype']}: {err}"
        return
    lead = (*case["extra_lead"], T)
    shape = (T, D, case["image"], case["image"]) if case["bank"] == "conv" else (*lead, D)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * case["scale"]).to(DTYPES.get(case["input_dtype"], dtype))
    if case["noncontiguous"]:
        x = _noncontiguous(x)
    x.requires_grad_(case["training"])
    meta = _meta(case["router"], (T,) if case["bank"] == "conv" else lead, E, gen)
    try:
        out = layer(x, meta=meta)
        if case["training"]:
            out.y.float().square().sum().backward()
    except MOEKIT_ERRORS as err:
        _assert_moekit_error(err, str(case))
        assert case["dtype"] == "bf16" or x.dtype != dtype, f"{case}: refused in {case['dtype']}: {err}"
        return
    except Exception as err:  # noqa: BLE001 - any other error is a raw one
        pytest.fail(f"{case}: raw {type(err).__name__}: {err}")
    expected = (T, bank.weight.shape[1], *x.shape[2:]) if case["bank"] == "conv" else tuple(x.shape)
    assert tuple(out.y.shape) == expected, f"{case}: output shape {tuple(out.y.shape)}, expected {expected}"
    assert x.dtype == dtype, f"{case}: an input of dtype {x.dtype} was accepted by a {dtype} layer"
    assert out.y.dtype == dtype, f"{case}: output dtype {out.y.dtype}"
    assert bool(torch.isfinite(out.y).all()), f"{case}: non-finite output"
    for term, value in out.aux.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), f"{case}: aux {term} = {value}"
    if case["training"]:
        assert x.grad is not None and x.grad.shape == x.shape and bool(torch.isfinite(x.grad).all()), \
            f"{case}: input gradient missing or non-finite"
