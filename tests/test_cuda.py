"""Every fast path against its reference on a CUDA device (skipped without one): the grouped matmul,
sparse dispatch (training and inference paths) for every bank, compressed banks, SMEAR's fused merge,
the transformers experts implementation and ``torch.compile``. ``benchmarks/gpu.sh`` runs these first."""

import pytest
import torch

import moekit
from moekit.experts import (
    LowRankSparseExperts,
    PackedLowRankSparseExperts,
    dispatch,
    dispatch_reference,
    grouped_linear,
    grouped_linear_reference,
)
from moekit.experts.merged_linear import merged_linear, merged_linear_reference
from moekit.types import RoutingDecision

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV, D = "cuda", 32
TOL = {torch.float32: dict(rtol=1e-4), torch.bfloat16: dict(rtol=3e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _decision(T: int, E: int, K: int, dtype: torch.dtype) -> RoutingDecision:
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEV)
    return RoutingDecision(ids, torch.softmax(torch.randn(T, K, device=DEV), -1).to(dtype), E)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to the dtype's rounding, relative to the largest reference value (bf16 sums of many
    products round at that scale, not per element)."""
    a, b = a.detach().float(), b.detach().float()
    scale = float(b.abs().max().clamp_min(1e-6))
    assert float((a - b).abs().max()) <= TOL[dtype]["rtol"] * scale, (float((a - b).abs().max()), scale)


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    y = fn()
    y.float().square().sum().backward()
    return y.detach(), [t.grad.clone() for t in tensors]


@DTYPES
def test_grouped_linear_matches_reference(dtype) -> None:
    x = torch.randn(40, D, device=DEV, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 48, D, device=DEV, dtype=dtype, requires_grad=True)
    sizes = torch.tensor([9, 0, 20, 3, 8], device=DEV)
    fast = _grads(lambda: grouped_linear(x, w, sizes), [x, w])
    ref = _grads(lambda: grouped_linear_reference(x, w, sizes), [x, w])
    for a, b in zip([fast[0], *fast[1]], [ref[0], *ref[1]]):
        _close(a, b, dtype)


BANKS = {
    "mlp": lambda E, dt: moekit.MLPExperts(E, D, 48, device=DEV, dtype=dt),
    "glu": lambda E, dt: moekit.GLUExperts(E, D, 48, device=DEV, dtype=dt),
    "adapter": lambda E, dt: moekit.AdapterExperts(E, D, 16, device=DEV, dtype=dt),
    "lowrank_sparse": lambda E, dt: LowRankSparseExperts(moekit.GLUExperts(E, D, 48), 4).to(DEV, dt),
    "packed_lowrank_sparse": lambda E, dt: PackedLowRankSparseExperts.from_masked(
        LowRankSparseExperts(moekit.MLPExperts(E, D, 48), 4)
    ).to(DEV, dt),
}


@DTYPES
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("bank", list(BANKS))
def test_dispatch_training_and_inference_paths_match_reference(bank, T, dtype) -> None:
    torch.manual_seed(0)
    experts = BANKS[bank](6, dtype)
    x = torch.randn(T, D, device=DEV, dtype=dtype, requires_grad=True)
    decision = _decision(T, 6, 2, dtype)
    params = list(experts.parameters())
    fast = _grads(lambda: dispatch(experts, x, decision), [x, *params])
    ref = _grads(lambda: dispatch_reference(experts, x, decision), [x, *params])
    for a, b in zip([fast[0], *fast[1]], [ref[0], *ref[1]]):
        _close(a, b, dtype)
    with torch.inference_mode():
        _close(dispatch(experts, x.detach(), decision), ref[0], dtype)


@DTYPES
def test_merged_linear_matches_reference(dtype) -> None:
    x = torch.randn(4, 16, D, device=DEV, dtype=dtype, requires_grad=True)
    p = torch.softmax(torch.randn(4, 6, device=DEV), -1).requires_grad_(True)
    w = torch.randn(6, 48, D, device=DEV, dtype=dtype, requires_grad=True)
    b = torch.randn(6, 48, device=DEV, dtype=dtype, requires_grad=True)
    fast = _grads(lambda: merged_linear(x, p, w, b, chunk_bytes=4096), [x, p, w, b])
    ref = _grads(lambda: merged_linear_reference(x, p, w, b), [x, p, w, b])
    for a, r in zip([fast[0], *fast[1]], [ref[0], *ref[1]]):
        _close(a, r, dtype)


def test_transformers_experts_implementation_matches_eager() -> None:
    transformers = pytest.importorskip("transformers")
    import moekit.integrations.hf  # noqa: F401  (registers "moekit")

    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).to(DEV).eval()
    ids = torch.randint(0, 128, (2, 12), device=DEV)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        ref = model(ids).logits
        model.set_experts_implementation("moekit")
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_compiled_layer_matches_eager() -> None:
    torch.manual_seed(0)
    router = moekit.TopKRouter(D, 8, 2, noisy=False, check_finite=False, device=DEV)
    layer = moekit.MoE(router, moekit.GLUExperts(8, D, 64, device=DEV, dtype=torch.bfloat16))
    x = torch.randn(64, D, device=DEV, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    _close(compiled(x).y, layer(x).y, torch.bfloat16)
