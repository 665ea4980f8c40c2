"""The native GEMV kernel (``moekit.experts.native_gemv``) against a float64 reference, the banks' inference
path through it against the training path, and the fallback to torch's kernels (switched off, no compiler).

One build per session: the library lands in the cache (``$MOEKIT_CACHE`` or ``~/.cache/moekit``) and later
sessions load it; only ``test_build_*`` compiles, into a temporary cache."""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.experts import dispatch, dispatch_reference, native_gemv
from moekit.experts import inference
from moekit.experts.inference import expert_linear
from moekit.types import RoutingDecision

from bank_cases import compressed_bank, with_threads

needs_kernel = pytest.mark.skipif(not native_gemv.available(), reason="no native GEMV kernel here (no compiler?)")
needs_fp16 = pytest.mark.skipif(torch.float16 not in native_gemv.dtypes(), reason="this build of the kernel has no fp16 (no F16C)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the dtypes this build of the kernel takes (fp16: with F16C), for tests that run every dtype
SERVED = [name for name, dt in DTYPES.items() if dt in native_gemv.dtypes()] or ["fp32"]
# relative to the output's largest entry: fp32 sums differ from float64 by rounding only; bf16 / fp16 also round the output
TOL = {"fp32": 2e-6, "bf16": 8e-3, "fp16": 1e-3}
#: a layer's output against the float64 reference that keeps h unrounded (bf16 / fp16 round it)
LAYER_TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 3e-3}
#: rows of x at the edges of the tile paths: 8 / 9 (dot / broadcast), 16 a + 1 and + 8 (half vector), 64 + r (passes)
EDGE_ROWS = [1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 40, 48, 56, 63, 64, 65, 72, 80, 88, 127, 128, 129]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", SERVED)
@pytest.mark.parametrize("M, O, I", [(1, 1, 1), (1, 7, 33), (2, 9, 16), (1, 70, 130), (2, 64, 96), (3, 13, 70), (4, 8, 64),
                                     (5, 6, 100), (6, 12, 100), (8, 64, 96), (9, 17, 129), (16, 70, 130), (17, 9, 64),
                                     (24, 19, 64), (40, 13, 96), (48, 29, 96), (56, 10, 128), (65, 11, 64), (72, 9, 64),
                                     (5, 40, 64), (16, 70, 128), (17, 33, 96), (32, 64, 256), (33, 20, 64), (64, 36, 128),
                                     (80, 20, 64), (18, 21, 70), (20, 64, 128), (36, 9, 96), (68, 13, 64),
                                     (84, 10, 128), (21, 12, 64), (10, 33, 96), (12, 70, 128), (11, 9, 100),
                                     (7, 20, 132), (25, 20, 64), (28, 12, 96), (22, 9, 64), (44, 10, 104),
                                     (1, 600, 40), (2, 521, 33), (4, 300, 64), (13, 290, 64), (40, 530, 32),
                                     (1, 41, 2081), (2, 19, 2050)])  # fmt: skip
def test_kernel_matches_float64_reference(M, O, I, dtype, threads) -> None:
    """Odd sizes: features not a multiple of the vector width (tails), partial row blocks, 1 to 84 rows: dot
    tiles of 4 rows of x (8-row weight blocks for 1-2 rows on AMD, 16-bit weights there from 2049 features), on AMD pair tiles (5-8 rows) and quad
    tiles (9-12 rows, inputs a multiple of 4 / bf16 8), broadcast tiles
    from 9 rows (1-4 vectors, half vectors of 1-8 rows, passes of 64 rows, the rows past a multiple of 16 on
    the dot or quad tiles; AVX2: fp32 from 8 rows, bf16 from 16, one or two vectors, passes of 16 rows, and
    below them two-row dot tiles for bf16 4-15 rows and fp32 5-6, odd weight rows alone),
    bf16 on AMX where the CPU has it; output rows across several chunks of 64 and 256 rows (the chunk of AVX2
    and AVX-512 builds), the last one partial; with and without bias, on 1 and 2 threads."""
    dt = DTYPES[dtype]
    W, x, b = torch.randn(O, I).to(dt), torch.randn(M, I).to(dt), torch.randn(O).to(dt)
    ref = x.double() @ W.double().T
    y = with_threads(threads, lambda: native_gemv.linear(x, W))
    yb = native_gemv.linear(x, W, b, threads=threads)
    assert y.dtype == dt and y.shape == (M, O)
    assert _rel_err(y, ref) <= TOL[dtype]
    assert _rel_err(yb, ref + b.double()) <= TOL[dtype]


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(M=st.one_of(st.integers(1, 140), st.sampled_from(EDGE_ROWS)), O=st.integers(1, 150), I=st.integers(1, 300),
       row_gap=st.integers(0, 5), dtype=st.sampled_from(SERVED), glu=st.booleans(), threads=st.integers(1, 3),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_kernel_matches_float64_reference_at_random_sizes(M, O, I, row_gap, dtype, glu, threads, seed) -> None:
    """Random sizes cross every path: dot tiles (1-8 rows; 8-row blocks for 1-2 rows, pair tiles for 5-8 and
    quad tiles for 9-12 on AMD), broadcast tiles (9+ rows: 1-4 vectors, a half vector, passes of 64 rows,
    weight-row tails), AMX where present; strided weight rows, odd inputs (bf16 odd I falls back to the dot
    tiles), the fused GLU, 1-3 threads."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    rows = 2 * O if glu else O
    W = torch.randn(rows, I + row_gap, generator=g).to(dt)[:, :I]  # rows I + row_gap apart
    x, b = torch.randn(M, I, generator=g).to(dt), torch.randn(rows, generator=g).to(dt)
    ref = x.double() @ W.double().T + b.double()
    if glu:
        gate, up = ref.chunk(2, -1)
        ref = F.silu(gate) * up
    y = native_gemv.linear(x, W, b, glu="silu" if glu else None, threads=threads)
    assert y.shape == (M, O) and y.dtype == dt
    assert _rel_err(y, ref) <= (2 if glu else 1) * TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", SERVED)
@pytest.mark.parametrize("act", list(native_gemv.GLU_ACTIVATIONS))
def test_fused_glu_matches_reference(act, dtype, threads) -> None:
    dt = DTYPES[dtype]
    F_, I = 11, 37
    W, x, b = torch.randn(2 * F_, I).to(dt), torch.randn(3, I).to(dt), torch.randn(2 * F_).to(dt)
    gate, up = (x.double() @ W.double().T + b.double()).chunk(2, -1)
    fn = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"), "relu": F.relu}[act]
    y = native_gemv.linear(x, W, b, glu=act, threads=threads)
    assert y.shape == (3, F_)
    assert _rel_err(y, fn(gate) * up) <= 2 * TOL[dtype]


@needs_kernel
def test_fused_silu_is_accurate_over_its_range() -> None:
    """The fused SiLU (8 lanes on AVX2: its own e^x) against float64 from -90 to 90: within 2e-7 relative
    from -80 up (torch's fp32 silu: 1.2e-7), within 1e-35 absolute below. x holds the gates and a 1 that
    every up row picks, so the output is silu(gate) alone."""
    torch.manual_seed(0)
    F_, M = 64, 128
    g = torch.cat([torch.linspace(-90, 90, M * F_ // 2), torch.randn(M * F_ // 2) * 4]).view(M, F_)
    W = torch.zeros(2 * F_, F_ + 1)
    W[torch.arange(F_), torch.arange(F_)] = 1.0
    W[F_:, F_] = 1.0
    y = native_gemv.linear(torch.cat([g, torch.ones(M, 1)], 1), W, glu="silu").double()
    g, y = g.flatten().double(), y.flatten()
    ref = g * torch.sigmoid(g)
    assert float(((y - ref).abs() / ref.abs())[g > -80].max()) <= 2e-7
    assert float((y - ref).abs()[g <= -80].max()) <= 1e-35


@needs_kernel
def test_native_calls_show_in_a_profile() -> None:
    """The C time is invisible to torch.profiler unless the call is a named range: a profile names both
    native entry points; with no profiler running the call pays for no range."""
    from torch.profiler import ProfilerActivity, profile

    W, x = torch.randn(2, 8, 16), torch.randn(3, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        native_gemv.linear(x, W[0])
        native_gemv.moe_ffn(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), W, W.transpose(1, 2).contiguous(),
                            glu=False, activation="relu")  # fmt: skip
    names = {e.key for e in prof.key_averages()}
    assert {"moekit::native_gemv", "moekit::native_moe_ffn"} <= names
    assert isinstance(native_gemv._profiled("moekit::native_gemv"), contextlib.nullcontext)


@needs_kernel
def test_kernel_reads_strided_rows_and_rejects_bad_arguments() -> None:
    W = torch.randn(3, 10, 20)[1]  # an expert slice of a stacked bank
    x = torch.randn(5, 40)[:, ::2]  # non-unit column stride: copied
    torch.testing.assert_close(native_gemv.linear(x, W), x @ W.T, rtol=1e-5, atol=1e-5)
    rows = torch.randn(8, 20)[::2]  # rows 2 apart
    torch.testing.assert_close(native_gemv.linear(x, rows), x @ rows.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x_MI, weight_OI must all be one dtype of float32, bfloat16"):
        native_gemv.linear(x.double(), W.double())
    with pytest.raises(ValueError, match="got x_MI bfloat16, weight_OI float32"):
        native_gemv.linear(x.bfloat16(), W)
    with pytest.raises(ValueError, match="agree on I"):
        native_gemv.linear(x, W.T)
    with pytest.raises(ValueError, match="glu must be one of"):
        native_gemv.linear(x, W, glu="swish")


@needs_fp16
def test_fp16_outputs_round_to_nearest_even_as_torch_does() -> None:
    """One-input products are exact in fp32, so the kernel's fp16 output is the rounding alone: it equals
    torch's fp32 -> fp16 conversion for normal and subnormal results, ties and overflow to inf; fp16 inputs
    widen exactly (a product with 1.0 gives every finite fp16 value back)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(4096, generator=g) * torch.exp2(torch.randint(-14, 9, (4096,), generator=g).float())).half()
    b = (torch.randn(4096, generator=g) * torch.exp2(torch.randint(-14, 9, (4096,), generator=g).float())).half()
    a[:3], b[:3] = torch.tensor([300.0, 2.0**-14, 1.0 + 2.0**-10]).half(), torch.tensor([300.0, 2.0**-3, 1.5]).half()  # 1.5 (1 + 2^-10): a tie
    y = torch.cat([native_gemv.linear(a[i : i + 1, None], b[i : i + 1, None]) for i in range(len(a))]).flatten()
    assert torch.equal(y, (a.float() * b.float()).half()) and y[0] == float("inf")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[torch.isfinite(every)]
    assert torch.equal(native_gemv.linear(torch.ones(1, 1, dtype=torch.float16), every[:, None]).flatten(), every)


@pytest.mark.parametrize("profile", ["AuthenticAMD", "AuthenticAMD+AVX2", "GenuineIntel+AMX", "GenuineIntel", "GenuineIntel+AVX2"])
def test_serves_the_measured_decode_sizes(profile, monkeypatch) -> None:
    monkeypatch.setattr(native_gemv, "cpu_profile", lambda: profile)
    for (dtype, packed), rules in native_gemv.MAX_ROWS[profile].items():
        for min_features, limit in rules:
            assert native_gemv.serves(limit, dtype, min_features, packed=packed) == (dtype in native_gemv.dtypes())
            assert not native_gemv.serves(limit + 1, dtype, min_features, packed=packed)
    for dtype, rules in native_gemv.PANEL_MAX_ROWS.get(profile, {}).items():
        for min_features, limit in rules:
            assert native_gemv.serves(limit, dtype, min_features, panels=True) == (dtype in native_gemv.dtypes())
            assert not native_gemv.serves(limit + 1, dtype, min_features, panels=True)
    assert not native_gemv.serves(0, torch.float32, 64)
    assert not native_gemv.serves(1, torch.float64, 64)
    assert native_gemv.serves(1, torch.float16, 64) == ((torch.float16, False) in native_gemv.MAX_ROWS[profile]
                                                         and torch.float16 in native_gemv.dtypes())  # fmt: skip
    assert not native_gemv.serves(1, torch.float32, 0)


def test_an_unmeasured_cpu_keeps_torchs_kernels(monkeypatch) -> None:
    monkeypatch.setattr(native_gemv, "cpu_profile", lambda: "SomeOtherVendor")
    assert not native_gemv.serves(1, torch.float32, 4096)
    assert not native_gemv.serves(1, torch.bfloat16, 4096)


# ----- one MoE layer in one call ------------------------------------------------------------------------
_ACT64 = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu,
          "identity": lambda v: v}  # fmt: skip


def _layer_reference(x, ids, w, first, second, b1, b2, glu, act, kept, hidden_dtype=None, magnitude=False):
    """Slot by slot in float64: ``sum_k w_tk * (W2 h + b2)``, ``h = act(gate) * up`` or ``act(W1 x + b1)``;
    ``hidden_dtype``: ``h`` rounded to it first, as the kernel rounds bf16 hidden values; ``magnitude``: the
    same sum of absolute terms instead (the scale a rounding error is relative to when the terms cancel)."""
    T, K = ids.shape
    y = torch.zeros(T, second.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            if kept is not None and not kept[t, k]:
                continue
            e = int(ids[t, k])
            h = first[e].double() @ x[t].double() + (0 if b1 is None else b1[e].double())
            h = _ACT64[act](h.chunk(2)[0]) * h.chunk(2)[1] if glu else _ACT64[act](h)
            h = h if hidden_dtype is None else h.to(hidden_dtype).double()
            if magnitude:
                y[t] += abs(float(w[t, k])) * (second[e].double().abs() @ h.abs() + (0 if b2 is None else b2[e].double().abs()))
            else:
                y[t] += float(w[t, k]) * (second[e].double() @ h + (0 if b2 is None else b2[e].double()))
    return y


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", SERVED)
@pytest.mark.parametrize("glu, act", [(True, "silu"), (True, "gelu_tanh"), (False, "gelu"), (False, "identity"), (False, "relu")])
@pytest.mark.parametrize("T, K, E, I, F_, O", [(1, 2, 8, 64, 96, 64), (3, 3, 5, 19, 70, 33), (16, 8, 128, 130, 24, 65),
                                               (40, 2, 4, 64, 96, 72), (80, 2, 3, 64, 96, 72), (3, 2, 4, 40, 300, 530)])  # fmt: skip
def test_moe_layer_matches_float64_reference(T, K, E, I, F_, O, glu, act, dtype, threads) -> None:
    """Odd sizes (tails, partial chunks of hidden features and output rows), repeated and dropped slots,
    biases, all activations, on 1 and 2 threads (both phases split; big enough that 2 threads run); the
    next two give each expert about 20 and 50 rows of multiples of 32 features (bf16: the AMX tiles, if any); the
    last has hidden features and output rows across several chunks (64 and 256 rows), the last one partial."""
    dt = DTYPES[dtype]
    torch.manual_seed(T * 100 + E)
    x = torch.randn(T, I).to(dt)
    first = (torch.randn(E, 2 * F_ if glu else F_, I) / I**0.5).to(dt)
    second = (torch.randn(E, O, F_) / F_**0.5).to(dt)
    b1, b2 = torch.randn(E, first.shape[1]).to(dt), torch.randn(E, O).to(dt)
    ids = torch.randint(0, E, (T, K))  # repeats allowed: one expert twice in a token
    w = torch.rand(T, K)
    kept = torch.rand(T, K) > 0.3
    for biases, mask in (((None, None), None), ((b1, b2), kept)):
        y = native_gemv.moe_ffn(x, ids, w, first, second, *biases, kept_TK=mask, glu=glu, activation=act, threads=threads)
        ref = _layer_reference(x, ids, w, first, second, *biases, glu, act, mask)
        assert y.dtype == dt and y.shape == (T, O)
        assert _rel_err(y, ref) <= LAYER_TOL[dtype]


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(T=st.one_of(st.integers(1, 120), st.sampled_from(EDGE_ROWS)), K=st.integers(1, 3), E=st.integers(1, 6),
       I=st.integers(1, 80), F_=st.integers(1, 70), O=st.integers(1, 70), dtype=st.sampled_from(SERVED), glu=st.booleans(),
       threads=st.integers(1, 3), seed=st.integers(0, 2**16), panels=st.booleans())  # fmt: skip
def test_moe_layer_matches_float64_reference_at_random_sizes(T, K, E, I, F_, O, dtype, glu, threads, seed, panels) -> None:
    """Random layers: groups of 1 to ~120 rows (every tile path in both phases), dropped slots, biases, on
    panel copies half the time where the kernel reads them. Tiny layers cancel, so the error is measured
    against the sum of absolute terms, and bf16 / fp16 against a reference that rounds the hidden values as
    the kernel does."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    x = torch.randn(T, I, generator=g).to(dt)
    first = (torch.randn(E, 2 * F_ if glu else F_, I, generator=g) / I**0.5).to(dt)
    second = (torch.randn(E, O, F_, generator=g) / F_**0.5).to(dt)
    b1, b2 = torch.randn(E, first.shape[1], generator=g).to(dt), torch.randn(E, O, generator=g).to(dt)
    ids, w = torch.randint(0, E, (T, K), generator=g), torch.rand(T, K, generator=g)
    kept = torch.rand(T, K, generator=g) > 0.2
    copies = {}
    if panels and native_gemv.panels_available():
        copies = {"first_panels": native_gemv.pack_panels(first, F_ if glu else None), "second_panels": native_gemv.pack_panels(second)}
    y = native_gemv.moe_ffn(x, ids, w, first, second, b1, b2, kept_TK=kept, glu=glu, activation="silu" if glu else "gelu",
                            threads=threads, **copies)  # fmt: skip
    args = (x, ids, w, first, second, b1, b2, glu, "silu" if glu else "gelu", kept)
    ref = _layer_reference(*args, hidden_dtype=None if dt == torch.float32 else dt)
    scale = _layer_reference(*args, magnitude=True).max().clamp_min(1e-30)
    assert y.shape == (T, O) and y.dtype == dt
    assert float((y.double() - ref).abs().max() / scale) <= {"fp32": 1e-6, "bf16": 1e-2, "fp16": 2e-3}[dtype]


@needs_kernel
def test_moe_layer_reads_strided_experts_and_rejects_bad_arguments() -> None:
    E, D, F_ = 4, 16, 8
    first, second = torch.randn(E, 2 * F_, 2 * D)[:, :, :D], torch.randn(E, D, F_)  # rows 2D apart
    x, ids, w = torch.randn(2, D), torch.tensor([[0, 3], [1, 1]]), torch.rand(2, 2)
    ref = _layer_reference(x, ids, w, first, second, None, None, True, "silu", None)
    assert _rel_err(native_gemv.moe_ffn(x, ids, w, first, second, glu=True, activation="silu"), ref) <= 1e-5
    with pytest.raises(ValueError, match=r"ids_TK must lie in \[0, 4\)"):
        native_gemv.moe_ffn(x, ids + 3, w, first, second, glu=True, activation="silu")
    with pytest.raises(ValueError, match="activation must be one of"):
        native_gemv.moe_ffn(x, ids, w, first, second, glu=True, activation="swish")
    with pytest.raises(ValueError, match="must agree"):
        native_gemv.moe_ffn(x, ids, w, first, second, glu=False, activation="silu")
    with pytest.raises(ValueError, match="must all be one dtype of float32, bfloat16"):
        native_gemv.moe_ffn(x.double(), ids, w, first.double(), second.double(), glu=True, activation="silu")
    with pytest.raises(ValueError, match="got x_TI float32, first_ERI float32, second_EOF bfloat16"):
        native_gemv.moe_ffn(x, ids, w, first, second.bfloat16(), glu=True, activation="silu")
    with pytest.raises(ValueError, match="first_bias_ER"):
        native_gemv.moe_ffn(x, ids, w, first, second, torch.randn(E, F_), glu=True, activation="silu")
    with pytest.raises(ValueError, match="unit column stride"):
        native_gemv.moe_ffn(x, ids, w, first.transpose(1, 2).contiguous().transpose(1, 2), second, glu=True, activation="silu")


def _wide_layer(seed: int, T: int = 128, I: int = 4096):
    """A bf16 layer whose working memory (gathered rows of x: 8 slots a token x 4096 features, 6 bytes each)
    dwarfs its output, weights and time: [T, I] inputs, 8 experts, K = 8, F = 16, O = 64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, I, generator=g).bfloat16()
    first, second = (torch.randn(8, 32, I, generator=g) / I**0.5).bfloat16(), (torch.randn(8, 64, 16, generator=g) / 4).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=g) for _ in range(T)])
    return x, ids, torch.rand(T, 8, generator=g), first, second


@needs_kernel
@pytest.mark.skipif(not hasattr(__import__("resource"), "getrusage"), reason="no getrusage")
def test_repeated_layer_calls_reuse_their_working_memory() -> None:
    """The second and later calls of one thread take the kept scratch block: no fresh pages (buffers allocated
    a call at a time took 2K page faults a call here)."""
    import resource

    args = _wide_layer(0)
    native_gemv.moe_ffn(*args, glu=True, activation="silu", threads=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        native_gemv.moe_ffn(*args, glu=True, activation="silu", threads=1)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults < 500, f"{faults:.0f} page faults a call"


@needs_kernel
def test_scratch_limit_bounds_kept_memory_without_changing_results() -> None:
    args = _wide_layer(1, T=24, I=512)
    expected = native_gemv.moe_ffn(*args, glu=True, activation="silu")
    previous = native_gemv.scratch_limit()
    assert previous == 256 << 20 and native_gemv.scratch_limit() == previous  # None only reads
    try:
        assert native_gemv.scratch_limit(0) == previous and native_gemv.scratch_limit() == 0
        for _ in range(2):  # nothing kept: every call allocates afresh
            assert torch.equal(native_gemv.moe_ffn(*args, glu=True, activation="silu"), expected)
    finally:
        native_gemv.scratch_limit(previous)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes must be a whole number of bytes"):
            native_gemv.scratch_limit(bad)


@needs_kernel
def test_layer_calls_from_concurrent_threads_keep_their_own_scratch() -> None:
    """Python threads calling at once (the call releases the GIL) each carve their own block; results equal
    those of one thread, calls of different sizes interleaved."""
    from concurrent.futures import ThreadPoolExecutor

    layers = [_wide_layer(seed, T=8 + 20 * seed, I=256 + 128 * seed) for seed in range(6)]
    expected = [native_gemv.moe_ffn(*args, glu=True, activation="silu", threads=1) for args in layers]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            got = list(pool.map(lambda args: native_gemv.moe_ffn(*args, glu=True, activation="silu", threads=1), layers))
            assert all(torch.equal(a, b) for a, b in zip(got, expected))


needs_panels = pytest.mark.skipif(not native_gemv.panels_available(), reason="the kernel here reads no panel copies (not AVX2)")


@needs_panels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", SERVED)
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("T, K, E, I, F_, O", [(40, 2, 4, 64, 96, 72), (80, 2, 3, 19, 70, 65), (90, 3, 4, 130, 200, 33),
                                               (33, 1, 2, 96, 64, 130), (150, 2, 2, 40, 130, 64)])  # fmt: skip
def test_moe_layer_on_panels_matches_the_plain_layer(T, K, E, I, F_, O, glu, dtype, threads) -> None:
    """Panel copies (``pack_panels``) give the plain layer's output: groups of 8 to ~150 rows (one or more
    passes of 16, partial vectors), chunks of hidden features and output rows cut short, odd inputs, biases
    and dropped slots, a GLU's two segments; fp32 sums in another order (rows past 16 run on the broadcast
    tiles, not the dot tiles), bf16 output rounded from them."""
    dt = DTYPES[dtype]
    torch.manual_seed(T + I)
    x = torch.randn(T, I).to(dt)
    first = (torch.randn(E, 2 * F_ if glu else F_, I) / I**0.5).to(dt)
    second = (torch.randn(E, O, F_) / F_**0.5).to(dt)
    b1, b2 = torch.randn(E, first.shape[1]).to(dt), torch.randn(E, O).to(dt)
    ids, w, kept = torch.randint(0, E, (T, K)), torch.rand(T, K), torch.rand(T, K) > 0.2
    panels = {"first_panels": native_gemv.pack_panels(first, F_ if glu else None), "second_panels": native_gemv.pack_panels(second)}
    args = (x, ids, w, first, second, b1, b2)
    plain = native_gemv.moe_ffn(*args, kept_TK=kept, glu=glu, activation="silu", threads=threads)
    on_panels = native_gemv.moe_ffn(*args, kept_TK=kept, glu=glu, activation="silu", threads=threads, **panels)
    ref = _layer_reference(x, ids, w, first, second, b1, b2, glu, "silu", kept, hidden_dtype=None if dt == torch.float32 else dt)
    assert on_panels.dtype == dt and on_panels.shape == (T, O)
    assert _rel_err(on_panels, ref) <= LAYER_TOL[dtype]
    assert _rel_err(on_panels, plain.double()) <= (1e-6 if dt == torch.float32 else 1e-2)


@needs_panels
@pytest.mark.parametrize("dtype", SERVED)
@pytest.mark.parametrize("rows", [5, 6, 7, 8, 9, 12, 16, 17, 18, 19, 20, 21, 25, 26, 33, 36, 41])
def test_panel_products_with_rows_past_their_passes(rows, dtype) -> None:
    """One expert of ``rows`` rows on panels: the 1-4 rows past a multiple of 16 and the ninth of 9, 25, 41 run
    on the tail tiles (a masked vector of each tile's weights, x broadcast), the rest on passes (fp32 from 6 rows:
    a pass of 8 lanes with some empty; 5 rows, and bf16 below 8 and at 9-10, on the dot tiles); odd inputs and a chunk cut
    short (R = 2 x 70 with a 6-row tile, 4, 2 and 1 at its end), against float64."""
    dt = DTYPES[dtype]
    torch.manual_seed(rows)
    I, F_, O = 131, 70, 37
    x = torch.randn(rows, I).to(dt)
    first, second = (torch.randn(1, 2 * F_, I) / I**0.5).to(dt), (torch.randn(1, O, F_) / F_**0.5).to(dt)
    ids, w = torch.zeros(rows, 1, dtype=torch.long), torch.rand(rows, 1)
    panels = {"first_panels": native_gemv.pack_panels(first, F_), "second_panels": native_gemv.pack_panels(second)}
    y = native_gemv.moe_ffn(x, ids, w, first, second, glu=True, activation="silu", threads=1, **panels)
    ref = _layer_reference(x, ids, w, first, second, None, None, True, "silu", None, hidden_dtype=None if dt == torch.float32 else dt)
    assert _rel_err(y, ref) <= LAYER_TOL[dtype]


@needs_panels
def test_pack_panels_permutes_each_tile_and_checks_its_arguments(monkeypatch) -> None:
    """A panel copy holds every weight once, a tile of h rows input-major (h values an input): the first tile
    of a chunk is its first 6 rows, and the GLU's up segment starts a chunk of its own."""
    E, R, I = 2, 2 * 67, 5
    w = torch.arange(E * R * I, dtype=torch.float32).reshape(E, R, I)
    for segment in (None, 67):
        p = native_gemv.pack_panels(w, segment)
        assert p.shape == w.shape and p.dtype == w.dtype and p.is_contiguous()
        assert torch.equal(p.flatten().sort().values, w.flatten())
        assert torch.equal(p[1].flatten()[: 6 * I], w[1, :6].T.flatten())  # rows 0-5, input-major
    up = native_gemv.pack_panels(w, 67)
    assert torch.equal(up[0].flatten()[67 * I : 73 * I], w[0, 67:73].T.flatten())  # the up segment's first tile
    assert torch.equal(up[0].flatten()[64 * I : 66 * I], w[0, 64:66].T.flatten())  # the gate's last chunk: 3 rows, 2 + 1
    assert not torch.equal(native_gemv.pack_panels(w)[0, 64:70], up[0, 64:70])  # unsegmented: one chunk, a 6-row tile
    for half in {torch.bfloat16, torch.float16} & set(native_gemv.dtypes()):  # 2-byte values move as fp32 ones do
        assert torch.equal(native_gemv.pack_panels(w.to(half)).float(), native_gemv.pack_panels(w.to(half).float()))
    with pytest.raises(ValueError, match="segment must divide"):
        native_gemv.pack_panels(w, 60)
    with pytest.raises(ValueError, match=r"w_ERI must be a CPU tensor \[E, R, I\] of float32, bfloat16"):
        native_gemv.pack_panels(w.double())
    with pytest.raises(ValueError, match="unit column stride"):
        native_gemv.pack_panels(w.transpose(1, 2))
    x, ids, wt = torch.randn(3, I), torch.tensor([[0], [1], [1]]), torch.rand(3, 1)
    second = torch.randn(E, 4, 67)
    with pytest.raises(ValueError, match="go together"):
        native_gemv.moe_ffn(x, ids, wt, w, second, glu=True, activation="silu", first_panels=up)
    with pytest.raises(ValueError, match="second_panels must be pack_panels"):
        native_gemv.moe_ffn(x, ids, wt, w, second, glu=True, activation="silu", first_panels=up, second_panels=second[:, :2])
    monkeypatch.setattr(native_gemv, "panels_available", lambda: False)
    with pytest.raises(RuntimeError, match="panel copies need the AVX2 build"):
        native_gemv.pack_panels(w)


@needs_panels
@pytest.mark.parametrize("dtype", SERVED)
def test_a_packed_bank_runs_its_layer_on_panels_rebuilt_when_weights_change(dtype, monkeypatch) -> None:
    """``pack_for_inference`` on a CPU whose kernel reads panels: prefill sizes run the one-call layer on
    the bank's panel copies (none for an unpacked bank), equal to the training path, and an in-place change
    of a weight rebuilds them."""
    dt = DTYPES[dtype]
    E, T = 4, 48  # 24 rows an expert: the broadcast tiles, under PANEL_MAX_ROWS
    experts = moekit.GLUExperts(E, D, 24).to(dt)
    x = torch.randn(T, D).to(dt)
    decision = RoutingDecision(torch.randint(0, E, (T, 2)), torch.softmax(torch.randn(T, 2), -1).to(dt), E)
    seen, layer = [], native_gemv.moe_ffn
    monkeypatch.setattr(native_gemv, "moe_ffn", lambda *a, **k: seen.append(k.get("first_panels")) or layer(*a, **k))
    tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    with torch.inference_mode():
        dispatch(experts, x, decision)
    assert seen and seen[-1] is None  # unpacked: the plain layer (or the expert loop) without panels
    moekit.experts.pack_for_inference(experts)
    with torch.inference_mode():
        y = dispatch(experts, x, decision)
    assert seen[-1] is not None
    torch.testing.assert_close(y, _training_path(experts, x, decision), **tol)
    first_copy = seen[-1]
    with torch.no_grad():
        experts.stacked_parameters()["gate_up_proj"].mul_(-1.0)
    with torch.inference_mode():
        y2 = dispatch(experts, x, decision)
    assert seen[-1] is not first_copy
    torch.testing.assert_close(y2, _training_path(experts, x, decision), **tol)


@needs_kernel
def test_decode_runs_the_whole_layer_in_one_native_call(monkeypatch) -> None:
    """Two-matrix banks at decode sizes take ``moe_ffn`` (no per-expert ``linear``); compressed banks,
    which have no two-matrix form, keep the expert loop on ``linear``."""
    layers, linears = [], []
    layer, linear = native_gemv.moe_ffn, native_gemv.linear
    monkeypatch.setattr(native_gemv, "moe_ffn", lambda *a, **k: layers.append(1) or layer(*a, **k))
    monkeypatch.setattr(native_gemv, "linear", lambda *a, **k: linears.append(1) or linear(*a, **k))
    decision = RoutingDecision(torch.tensor([[4, 1]]), torch.tensor([[0.6, 0.4]]), 6)
    with torch.inference_mode():
        for name in ("mlp", "glu", "glu_gelu_tanh", "mlp_relu_out_dim"):
            dispatch(BANKS[name](6), torch.randn(1, D), decision)
        assert len(layers) == 4 and not linears
        dispatch(BANKS["packed_glu"](6), torch.randn(1, D), decision)
        assert len(layers) == 4 and linears
        dispatch(moekit.MLPExperts(6, D, 24, activation="tanh"), torch.randn(1, D), decision)  # no fused tanh
        assert len(layers) == 4


# ----- banks through the seam ------------------------------------------------------------------------
D = 19  # not a multiple of the vector width


BANKS = {
    "mlp": lambda E: moekit.MLPExperts(E, D, 24),
    "mlp_relu_out_dim": lambda E: moekit.MLPExperts(E, D, 24, out_dim=8, activation="relu", bias=False),
    "glu": lambda E: moekit.GLUExperts(E, D, 24),
    "glu_gelu_tanh": lambda E: moekit.GLUExperts(E, D, 24, activation="gelu_tanh"),
    "lowrank_glu": lambda E: compressed_bank("glu", False, E, D),
    "packed_glu": lambda E: compressed_bank("glu", True, E, D),
    "packed_mlp": lambda E: compressed_bank("mlp", True, E, D),
}
# (T, E, ids): one token, experts repeated within a token, a single expert, more tokens than the kernel serves
ROUTINGS = {
    "one_token": (1, 6, [[4, 1]]),
    "repeated_experts": (2, 6, [[3, 3], [3, 0]]),
    "single_expert": (3, 1, [[0], [0], [0]]),
    "over_the_crossover": (24, 2, [[0, 1]] * 24),
}


def _spy(monkeypatch) -> list:
    """Calls of the native kernels: rows of x per ``linear`` call, mean rows per touched expert per
    ``moe_ffn`` call (what ``native_layer`` decides on)."""
    calls = []
    linear, layer = native_gemv.linear, native_gemv.moe_ffn

    def mean_rows(ids: torch.Tensor, E: int) -> int:
        return -(-ids.numel() // min(E, ids.numel()))

    monkeypatch.setattr(native_gemv, "linear", lambda *a, **k: calls.append(a[0].shape[0]) or linear(*a, **k))
    monkeypatch.setattr(native_gemv, "moe_ffn", lambda *a, **k: calls.append(mean_rows(a[1], a[3].shape[0])) or layer(*a, **k))
    return calls


def _training_path(bank, x, decision):
    for p in bank.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        y = dispatch(bank, x, decision)
    assert y.requires_grad
    return y.detach()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", SERVED)
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("bank", list(BANKS))
def test_bank_inference_on_the_kernel_equals_training_path(bank, routing, dtype, threads, monkeypatch) -> None:
    T, E, ids = ROUTINGS[routing]
    dt = DTYPES[dtype]
    experts = BANKS[bank](E).to(dt)
    x = torch.randn(T, D).to(dt)
    decision = RoutingDecision(torch.tensor(ids), torch.softmax(torch.randn(T, len(ids[0])), -1).to(dt), E)
    calls = _spy(monkeypatch)
    with torch.inference_mode():
        y = with_threads(threads, lambda: dispatch(experts, x, decision))
    rows = max(int((decision.ids_TK == e).sum()) for e in range(E))
    if native_gemv.serves(rows, dt, D):
        assert calls, "the inference path did not run the native kernel"
    assert all(native_gemv.serves(m, dt, D) for m in calls)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y, _training_path(experts, x, decision), **tol)
    with torch.no_grad():
        torch.testing.assert_close(y, dispatch_reference(experts, x, decision), **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", SERVED)
def test_hf_experts_implementation_runs_the_kernel(dtype, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    import moekit.integrations.hf  # noqa: F401  (registers "moekit")

    dt = DTYPES[dtype]
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    module = MixtralExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    module = module.to(dt)
    x, ids = torch.randn(3, D).to(dt), torch.tensor([[0, 2], [2, 3], [1, 0]])
    w = torch.softmax(torch.randn(3, 2), -1).to(dt)
    with torch.no_grad():
        eager = type(module).forward.__wrapped__(module, x, ids, w)
        calls = _spy(monkeypatch)
        y = moekit.integrations.hf.experts_impl.moekit_experts_forward(module, x, ids, w)
    rows = max(int((ids == e).sum()) for e in range(4))
    assert bool(calls) == native_gemv.serves(rows, dt, D)  # the kernel where this CPU's profile serves the dtype
    torch.testing.assert_close(y, eager, **(dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=3e-2, atol=3e-2)))


@needs_kernel
def test_the_expert_loop_takes_the_kernel_for_decode_rows_only(monkeypatch) -> None:
    """Unpacked banks on CPU run the expert loop at every size (never the sorted grouped GEMM): a few rows
    per expert on the kernel, many rows per expert (or the kernel switched off) on torch's kernels."""
    experts = moekit.GLUExperts(8, D, 24).to(torch.bfloat16)
    monkeypatch.setattr(inference, "native_layer", lambda *a, **k: None)  # the expert loop, on linear
    grouped = []
    original = moekit.GLUExperts.grouped_forward
    monkeypatch.setattr(moekit.GLUExperts, "grouped_forward", lambda self, *a: grouped.append(1) or original(self, *a))
    calls = _spy(monkeypatch)
    decode = RoutingDecision(torch.stack([torch.randperm(8)[:2] for _ in range(4)]), torch.full((4, 2), 0.5), 8)
    prefill = RoutingDecision(torch.randint(0, 8, (1024, 2)), torch.full((1024, 2), 0.5), 8)  # ~256 rows per expert
    x4, x_prefill = torch.randn(4, D).bfloat16(), torch.randn(1024, D).bfloat16()
    with torch.inference_mode():
        dispatch(experts, x4, decode)
        assert calls and not grouped
        calls.clear()
        dispatch(experts, x_prefill, prefill)
        assert not calls and not grouped
        monkeypatch.setenv("MOEKIT_NATIVE_GEMV", "0")
        dispatch(experts, x4, decode)
        assert not calls and not grouped


# ----- fallback ----------------------------------------------------------------------------------------
@pytest.fixture
def fresh_library():
    for cached in (native_gemv._built, native_gemv._library, native_gemv.cpu_profile, native_gemv.cpu_vendor):
        cached.cache_clear()
    yield
    for cached in (native_gemv._built, native_gemv._library, native_gemv.cpu_profile, native_gemv.cpu_vendor):
        cached.cache_clear()


def _glu_output():
    experts = moekit.GLUExperts(4, D, 24)
    torch.manual_seed(1)
    x, decision = torch.randn(1, D), RoutingDecision(torch.tensor([[1, 3]]), torch.tensor([[0.7, 0.3]]), 4)
    with torch.inference_mode():
        return experts, x, decision, dispatch(experts, x, decision)


@needs_kernel
def test_switched_off_uses_torch_with_the_same_output(monkeypatch) -> None:
    torch.manual_seed(0)
    experts, x, decision, on = _glu_output()
    monkeypatch.setenv("MOEKIT_NATIVE_GEMV", "0")
    calls = _spy(monkeypatch)
    assert not native_gemv.available() and not native_gemv.serves(1, torch.float32, D)
    with torch.inference_mode():
        off = dispatch(experts, x, decision)
    assert not calls
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-6)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, fresh_library) -> None:
    monkeypatch.setattr(native_gemv, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert not native_gemv.available()
    assert not native_gemv.available()  # cached: no second warning (pytest.warns above took the only one)
    x, W = torch.randn(1, D), torch.randn(5, D)
    torch.testing.assert_close(expert_linear(x, W), F.linear(x, W))
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_gemv.linear(x, W)
    assert native_gemv.build_info()["reason"].startswith("no C compiler")


def test_failed_build_falls_back(monkeypatch, tmp_path, fresh_library) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return x + 1; }\n")  # gcc's last stderr lines: a caret, a note
    monkeypatch.setattr(native_gemv, "SOURCE", broken)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="failed"):
        assert not native_gemv.available()
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").iterdir())  # temporary files removed
    assert "error" in native_gemv.build_info()["reason"]  # the compiler's first error, not its last line (a caret)


@pytest.mark.skipif(native_gemv._compiler() is None, reason="no C compiler")
def test_build_into_a_fresh_cache_is_atomic_and_keyed(monkeypatch, tmp_path, fresh_library) -> None:
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    assert native_gemv.available()
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("native_gemv-") and built[0].suffix == ".so"
    native_gemv._built.cache_clear()
    run = native_gemv.subprocess.run
    monkeypatch.setattr(native_gemv.subprocess, "run", lambda cmd, **k: pytest.fail(f"rebuilt: {cmd}") if "-o" in cmd else run(cmd, **k))
    assert native_gemv._built()[0] == built[0]  # the cached library is found, not rebuilt
    monkeypatch.setattr(native_gemv, "_cpu_flags", lambda: "another cpu")
    native_gemv._built.cache_clear()
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):
        native_gemv._built()  # another CPU is another key
    assert os.listdir(tmp_path) == [built[0].name]
