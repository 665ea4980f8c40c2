"""bf16 and fp16 products widened to fp32 in blocks (``moekit.experts.upcast_gemm``) against the fp32 product,
and the kernel seam taking them where torch's GEMM in that dtype is its reference loop (CPUs without oneDNN
bf16 / fp16)."""

import types

import pytest
import torch
import torch.nn.functional as F

from moekit.experts import native_gemv, upcast_gemm
from moekit.experts.inference import expert_linear


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double()).to(x.dtype)


@pytest.mark.parametrize("block_bytes", [4 * 24, 4 * 24 * 5, upcast_gemm.BLOCK_BYTES])  # 1 row, 5 rows (O=13: a ragged last block), all
@pytest.mark.parametrize("M", [1, 3, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocks_equal_the_fp32_product(block_bytes, M, bias, dtype, monkeypatch) -> None:
    monkeypatch.setattr(upcast_gemm, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 24, generator=g).to(dtype)
    w = torch.randn(13, 24, generator=g).to(dtype)
    b = torch.randn(13, generator=g).to(dtype) if bias else None
    y = upcast_gemm.linear_via_fp32(x, w, b)
    assert y.dtype == dtype and y.shape == (M, 13) and y.is_contiguous()
    torch.testing.assert_close(y, _reference(x, w, b), rtol=1e-2, atol=1e-2)
    fp32 = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert (y != fp32).float().mean() < 0.05  # the same fp32 product up to summation order, then the same rounding


def test_blocks_read_rows_with_a_stride() -> None:
    w = torch.randn(16, 24).bfloat16()
    x = torch.randn(4, 24).bfloat16()
    torch.testing.assert_close(upcast_gemm.linear_via_fp32(x, w[::2]), _reference(x, w[::2], None), rtol=1e-2, atol=1e-2)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"agree on I; got \(2, 8\) and \(3, 7\)"):
        upcast_gemm.linear_via_fp32(torch.zeros(2, 8).bfloat16(), torch.zeros(3, 7).bfloat16())


@pytest.mark.parametrize("reference_loop", [True, False])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_seam_widens_where_torch_has_no_gemm_in_the_dtype(reference_loop, glu, dtype, monkeypatch) -> None:
    calls = []
    real = upcast_gemm.linear_via_fp32
    monkeypatch.setattr(upcast_gemm, "torch_gemm_is_reference", lambda dt: reference_loop and dt in (torch.bfloat16, torch.float16))
    monkeypatch.setattr(upcast_gemm, "linear_via_fp32", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(native_gemv, "serves", lambda *a, **k: False)  # rows the native kernel leaves to torch
    x, w, b = torch.randn(64, 24).to(dtype), torch.randn(32, 24).to(dtype), torch.randn(32).to(dtype)

    def swiglu(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    act = swiglu if glu else F.gelu
    y = expert_linear(x, w, b, activation="silu" if glu else "gelu", act_fn=act, glu=glu)
    assert calls == ([(64, 24)] if reference_loop else [])
    torch.testing.assert_close(y, act(_reference(x, w, b)), rtol=2e-2, atol=2e-2)
    calls.clear()
    expert_linear(x.float(), w.float(), b.float(), act_fn=act, glu=glu)  # fp32 keeps its kernels
    assert calls == []
    if dtype == torch.float16:  # below its crossover fp16 stays on torch
        expert_linear(x[: upcast_gemm.MIN_ROWS[dtype] - 1], w, b, act_fn=act, glu=glu)
        assert calls == []


@pytest.mark.parametrize("reference_loop", [True, False])
def test_blocks_serve_from_each_dtypes_crossover(reference_loop, monkeypatch) -> None:
    """fp16 from 4 rows, bf16 from 1, only where torch's GEMM in the dtype is its reference loop; fp32 never."""
    monkeypatch.setattr(upcast_gemm, "torch_gemm_is_reference", lambda dt: reference_loop)
    assert [upcast_gemm.serves(torch.float16, m) for m in (1, 3, 4, 64)] == [False, False, reference_loop, reference_loop]
    assert [upcast_gemm.serves(torch.bfloat16, m) for m in (1, 64)] == [reference_loop] * 2
    assert not upcast_gemm.serves(torch.float32, 64)


def test_fp32_never_counts_as_the_reference_loop() -> None:
    assert not upcast_gemm.torch_gemm_is_reference(torch.float32) and not upcast_gemm.torch_gemm_is_reference(torch.float64)


@pytest.mark.parametrize(
    ("vendor", "isa", "amx", "profile"),
    [("AuthenticAMD", "avx512f+bf16", 0, "AuthenticAMD"), ("AuthenticAMD", "avx512f", 0, "AuthenticAMD"),
     ("AuthenticAMD", "avx2", 0, "AuthenticAMD+AVX2"), ("AuthenticAMD", "portable", 0, "AuthenticAMD+portable"),
     ("GenuineIntel", "avx512f+bf16", 1, "GenuineIntel+AMX"), ("GenuineIntel", "avx2", 0, "GenuineIntel+AVX2")],
)  # fmt: skip
def test_cpu_profile_names_the_kernels_isa(vendor, isa, amx, profile, monkeypatch) -> None:
    """An AVX2 build has its own crossovers (narrow tiles): measured on AMD, decode rows only on Intel; a scalar
    build has none."""
    lib = types.SimpleNamespace(moekit_gemv_isa=lambda: isa.encode(), moekit_amx_usable=lambda: amx, moekit_dtype_usable=lambda code: code < 3)
    monkeypatch.setattr(native_gemv, "_library", lambda: lib)
    monkeypatch.setattr(native_gemv, "cpu_vendor", lambda: vendor)
    assert native_gemv.cpu_profile.__wrapped__() == profile
    monkeypatch.setattr(native_gemv, "cpu_profile", lambda: profile)
    has_table = profile in ("AuthenticAMD", "AuthenticAMD+AVX2", "GenuineIntel+AMX", "GenuineIntel+AVX2")
    assert native_gemv.serves(1, torch.float32, 64) == (native_gemv.available() and has_table)
