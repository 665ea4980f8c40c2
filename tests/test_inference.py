"""The forward-only path of sparse dispatch (``moekit.experts.inference``) against the training path and
the per-expert reference, for every bank with ``expert_inference``, in fp32, bf16 and fp16, plain and
oneDNN-packed, on one thread and with the experts split over two."""

import copy
import importlib
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.experts import (
    dispatch,
    dispatch_reference,
    inference,
    native_gemv,
    pack_for_inference,
)
from moekit.experts.inference import expert_linear, packing_available, plan_inference
from moekit.types import RoutingDecision

from bank_cases import compressed_bank, with_threads

D = 16
dispatch_module = importlib.import_module("moekit.experts.dispatch")

BANKS = {
    "mlp": lambda E, dt: moekit.MLPExperts(E, D, 24, dtype=dt),
    "mlp_relu_nobias": lambda E, dt: moekit.MLPExperts(E, D, 24, bias=False, activation="relu", dtype=dt),
    "mlp_out_dim": lambda E, dt: moekit.MLPExperts(E, D, 24, out_dim=8, activation="gelu_tanh", dtype=dt),
    "glu": lambda E, dt: moekit.GLUExperts(E, D, 24, dtype=dt),
    "glu_gelu": lambda E, dt: moekit.GLUExperts(E, D, 24, activation="gelu", dtype=dt),
}


def _decision(T: int, E: int, K: int, *, kept: bool = False, dtype=torch.float32) -> RoutingDecision:
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K), -1).to(dtype)
    kept_TK = (torch.rand(T, K) > 0.4) if kept else None
    return RoutingDecision(ids, weights, E, kept_TK=kept_TK)


# name -> (T, E, K, kept)
CASES = {
    "decode_one_token": (1, 6, 2, False),
    "few_tokens_empty_experts": (5, 12, 2, False),
    "prefill": (40, 6, 3, False),
    "dropped_slots": (9, 5, 2, True),
    "single_expert": (3, 1, 1, False),
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}  # fmt: skip


def _training_path(bank, x, decision):
    """The output of the training path (grad on): the sorted grouped GEMM and weighted scatter."""
    params = [p.requires_grad_(True) for p in bank.parameters()]
    with torch.enable_grad():
        y = dispatch(bank, x, decision)
    assert y.requires_grad and params
    return y.detach()


def _use(path: str, experts, monkeypatch) -> None:
    """Force one of the inference path's three ways: the expert loop, the sorted grouped GEMM, or packed
    (the one-call native layer, which serves decode sizes of the plain banks, is tested in
    test_inference_native.py; here it is off)."""
    monkeypatch.setattr(inference, "native_layer", lambda *a, **k: None)
    if path == "loop":
        monkeypatch.setattr(inference, "SORTED_GROUPED_MIN_TOKENS", 10**9)
    if path == "sorted":
        monkeypatch.setattr(inference, "SORTED_GROUPED_MIN_TOKENS", 1)
        monkeypatch.setenv("MOEKIT_NATIVE_GEMV", "0")  # else decode sizes keep the loop (on the native kernel)
    if path == "packed":
        monkeypatch.setattr(inference, "PACKED_MIN_EXPERT_BYTES", 0)  # the test banks are tiny
        pack_for_inference(experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", ["loop", "sorted", "packed"])
@pytest.mark.parametrize("bank", list(BANKS))
@pytest.mark.parametrize("case", list(CASES))
def test_inference_path_equals_training_path(bank, case, path, dtype, monkeypatch) -> None:
    T, E, K, kept = CASES[case]
    experts = BANKS[bank](E, dtype)
    _use(path, experts, monkeypatch)
    x = torch.randn(T, D, dtype=dtype)
    decision = _decision(T, E, K, kept=kept, dtype=dtype)
    taken = []
    original = inference.dispatch_inference
    monkeypatch.setattr(dispatch_module, "dispatch_inference", lambda *a: taken.append(1) or original(*a))
    with torch.inference_mode():
        y = dispatch(experts, x, decision)
    with torch.no_grad():
        y_no_grad = dispatch(experts, x, decision)
        ref = dispatch_reference(experts, x, decision)
    assert taken, "the inference path was not taken"
    if path == "packed" and packing_available(dtype, "cpu"):
        assert inference.inference_pack(experts) is not None
    assert y.dtype == dtype and y.shape == (T, experts.out_dim)
    train = _training_path(experts, x, decision)
    torch.testing.assert_close(y, train, **TOL[dtype])
    torch.testing.assert_close(y_no_grad, y, rtol=0, atol=0)
    torch.testing.assert_close(y, ref, **TOL[dtype])


def _infer(experts, x, decision) -> torch.Tensor:
    with torch.inference_mode():
        return dispatch(experts, x, decision)


def _spy_splits(monkeypatch) -> list:
    """The splits of touched experts that the expert loop hands to the CPU pool."""
    splits = []
    run_split = inference.cpu_grouped.run_split
    monkeypatch.setattr(inference.cpu_grouped, "run_split", lambda s, fn: splits.append(s) or run_split(s, fn))
    return splits


@pytest.mark.parametrize("path", ["loop", "packed"])
def test_experts_split_over_threads_equal_one_thread(path, monkeypatch) -> None:
    experts = moekit.GLUExperts(12, D, 24)
    _use(path, experts, monkeypatch)
    x = torch.randn(7, D)
    decision = _decision(7, 12, 3)
    with torch.inference_mode():
        one = dispatch(experts, x, decision)
    splits = _spy_splits(monkeypatch)
    two = with_threads(2, lambda: _infer(experts, x, decision))
    assert splits and len(splits[0].runs) == 2, "the touched experts were not split over the two threads"
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)


def test_experts_with_many_rows_keep_the_kernels_threads(monkeypatch) -> None:
    """At MAX_SPLIT_ROWS rows per expert or more the experts run one after the other, each product on
    all intra-op threads (as the training path's grouped GEMM does), not split over the pool."""
    monkeypatch.setattr(inference.cpu_grouped, "MAX_SPLIT_ROWS", 8)
    splits = _spy_splits(monkeypatch)
    experts = moekit.GLUExperts(4, D, 24)
    x, decision = torch.randn(40, D), _decision(40, 4, 2)  # ~20 rows per expert
    y = with_threads(2, lambda: _infer(experts, x, decision))
    assert not splits
    torch.testing.assert_close(y, dispatch_reference(experts, x, decision).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_products_on_cpu_take_the_expert_loop(dtype, threads, monkeypatch) -> None:
    """Past decode sizes on CPU the experts run one by one, never the sorted grouped GEMM (F.grouped_mm's
    CPU kernel copies the weights on every call); fp32 on oneDNN over the plain weights (faster than the
    MKL GEMM of F.linear below MKL_MIN_ROWS). One thread adds each expert's output onto its tokens directly, two split the
    experts over the pool: both equal the reference."""
    experts = moekit.GLUExperts(4, D, 24, dtype=dtype)
    x = torch.randn(200, D, dtype=dtype)  # ~100 rows per expert: past every CPU's native row limit
    decision = _decision(200, 4, 2, dtype=dtype)
    monkeypatch.setattr(inference, "native_layer", lambda *a, **k: None)
    grouped, onednn = [], []
    original = moekit.GLUExperts.grouped_forward
    monkeypatch.setattr(moekit.GLUExperts, "grouped_forward", lambda self, *a: grouped.append(1) or original(self, *a))
    lp = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(inference.torch.ops.mkldnn, "_linear_pointwise", lambda *a: onednn.append(1) or lp(*a), raising=False)
    y = with_threads(threads, lambda: _infer(experts, x, decision))
    plain = inference.reads_plain_weights(dtype)
    assert plain == (dtype == torch.float32 and packing_available(dtype, "cpu"))
    rows = torch.bincount(decision.ids_TK.flatten(), minlength=4).tolist()  # oneDNN unless MKL leads at that size
    assert not grouped and bool(onednn) == any(inference.reads_plain_weights(dtype, r, D) for r in rows)
    torch.testing.assert_close(y, dispatch_reference(experts, x, decision).detach(), **TOL[dtype])


@pytest.mark.skipif(not packing_available(torch.float32, "cpu"), reason="no oneDNN on this build")
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("profile, mkl_from", [("GenuineIntel+AMX", (512, 512)), ("GenuineIntel", (512, 512)),
                                               ("AuthenticAMD", None), ("AuthenticAMD+AVX2", (64, 256))])  # fmt: skip
def test_large_fp32_products_take_mkl_where_it_leads(profile, mkl_from, packed, monkeypatch) -> None:
    """fp32 products from the CPU's MKL_MIN_ROWS rows run F.linear (MKL), packed or not (Intel from 512 rows;
    AVX2 AMD from 64 below 3584 features, from 256 at 3584 and more), and oneDNN on AVX-512 AMD at every size;
    fewer rows take oneDNN; all equal F.linear. ``mkl_from``: the first MKL rows at D and at 4096 features."""
    monkeypatch.setattr(native_gemv, "cpu_profile", lambda: profile)
    lp = torch.ops.mkldnn._linear_pointwise
    onednn = []
    monkeypatch.setattr(inference.torch.ops.mkldnn, "_linear_pointwise", lambda *a: onednn.append(1) or lp(*a), raising=False)
    for features, first_mkl in zip((D, 4096), mkl_from or (None, None)):
        W = torch.randn(24, features)
        P = torch.ops.mkldnn._reorder_linear_weight(W, inference.PACK_HINT) if packed else None
        for rows in (65, 128, 256, 512):  # past the native kernel's rows on every CPU
            onednn.clear()
            x = torch.randn(rows, features)
            torch.testing.assert_close(expert_linear(x, W, packed=P), F.linear(x, W), rtol=1e-4, atol=1e-4)
            assert bool(onednn) == (first_mkl is None or rows < first_mkl), (features, rows)


def test_grouped_split_under_inference_mode(monkeypatch) -> None:
    """The CPU split of the training path's grouped GEMM used to fail in inference mode (its workers
    wrote into inference tensors outside inference mode)."""
    monkeypatch.setattr(inference.cpu_grouped, "_intra_op_threads", lambda: 2)
    monkeypatch.setattr(inference.cpu_grouped, "MIN_SPLIT_MACS", 0)
    experts = moekit.AdapterExperts(4, D, 8)  # no expert_inference: runs grouped_forward under inference mode
    x = torch.randn(20, D)
    decision = _decision(20, 4, 2)
    with torch.inference_mode():
        y = dispatch(experts, x, decision)
    torch.testing.assert_close(y, dispatch_reference(experts, x, decision).detach())


def test_small_experts_keep_the_plain_kernels() -> None:
    experts = pack_for_inference(moekit.GLUExperts(4, D, 24))  # 3 KB per expert: cached, oneDNN calls cost more
    assert experts._inference_pack is not None and inference.inference_pack(experts) is None


def test_one_token_needs_no_sort(monkeypatch) -> None:
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: pytest.fail("sorted a single token's slots"))
    plan = plan_inference(RoutingDecision(torch.tensor([[4, 1, 3]]), torch.tensor([[2.0, 1.0, 3.0]]), 6))
    assert plan.groups == ((1, 0, 1), (3, 1, 2), (4, 2, 3))
    assert plan.weight_N.tolist() == [1.0, 3.0, 2.0]


def test_training_keeps_the_training_path(monkeypatch) -> None:
    monkeypatch.setattr(dispatch_module, "dispatch_inference", lambda *a: pytest.fail("inference path under autograd"))
    experts = moekit.GLUExperts(4, D, 24)
    decision = _decision(6, 4, 2)
    dispatch(experts, torch.randn(6, D), decision).sum().backward()
    assert experts.gate_up_proj.grad is not None


@pytest.mark.skipif(not packing_available(torch.float32, "cpu"), reason="no oneDNN on this build")
def test_pack_follows_weight_updates_and_leaves_state_untouched(monkeypatch) -> None:
    monkeypatch.setattr(inference, "PACKED_MIN_EXPERT_BYTES", 0)
    experts = moekit.GLUExperts(4, D, 24)
    keys = set(experts.state_dict())
    pack_for_inference(experts)
    x, decision = torch.randn(5, D), _decision(5, 4, 2)
    with torch.no_grad():
        before = dispatch(experts, x, decision)
        experts.down_proj.mul_(2)  # an in-place update: the packed copy must follow
        after = dispatch(experts, x, decision)
        experts.load_state_dict({k: v * 0.5 for k, v in experts.state_dict().items()})
        loaded = dispatch(experts, x, decision)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded, dispatch_reference(experts, x, decision), rtol=1e-5, atol=1e-6)
    assert set(experts.state_dict()) == keys
    for clone in (copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))):
        with torch.no_grad():
            torch.testing.assert_close(dispatch(clone, x, decision), loaded)
    assert inference.inference_pack(experts) is not None
    buf = io.BytesIO()
    torch.save(experts.state_dict(), buf)
    pack_for_inference(experts, False)
    assert experts._inference_pack is None


@pytest.mark.skipif(not packing_available(torch.float32, "cpu"), reason="no oneDNN on this build")
def test_pack_of_a_bank_built_under_inference_mode(monkeypatch) -> None:
    """Weights made under ``inference_mode`` are inference tensors (no version counter): packing still
    works, and a new weight tensor (a re-assigned parameter) is packed afresh."""
    monkeypatch.setattr(inference, "PACKED_MIN_EXPERT_BYTES", 0)
    x, decision = torch.randn(5, D), _decision(5, 4, 2)
    with torch.inference_mode():
        experts = pack_for_inference(moekit.GLUExperts(4, D, 24))
        packed = dispatch(experts, x, decision)
        torch.testing.assert_close(packed, dispatch_reference(experts, x, decision), rtol=1e-5, atol=1e-6)
        experts.down_proj = torch.nn.Parameter(experts.down_proj * 2, requires_grad=False)
        torch.testing.assert_close(dispatch(experts, x, decision), 2 * packed, rtol=1e-5, atol=1e-6)


def test_pack_for_inference_needs_a_packable_bank() -> None:
    with pytest.raises(ValueError, match="no expert bank with packable matrices"):
        pack_for_inference(moekit.AdapterExperts(4, D, 8))


def test_moe_layer_in_eval_uses_the_inference_path(monkeypatch) -> None:
    layer = moekit.MoE(moekit.TopKRouter(D, 8, 2, noisy=False), moekit.GLUExperts(8, D, 24)).eval()
    x = torch.randn(2, 3, D)
    train = layer(x).y.detach()
    taken = []
    original = inference.dispatch_inference
    monkeypatch.setattr(dispatch_module, "dispatch_inference", lambda *a: taken.append(1) or original(*a))
    with torch.inference_mode():
        y = layer(x).y
    assert taken
    torch.testing.assert_close(y, train, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("packed", [False, True], ids=["masked", "packed"])
@pytest.mark.parametrize("kind", ["glu", "mlp"])
@pytest.mark.parametrize("case", list(CASES))
def test_compressed_inference_equals_training_path(case, kind, packed, dtype, monkeypatch) -> None:
    """Compressed banks run one expert at a time on the inference path (their factors and kept rows
    read once), equal to the training path and to the dense reference (``dense_weight``)."""
    T, E, K, kept = CASES[case]
    experts = compressed_bank(kind, packed, E, D, dtype)
    x = torch.randn(T, D, dtype=dtype)
    decision = _decision(T, E, K, kept=kept, dtype=dtype)
    calls = []
    original = type(experts).expert_inference
    monkeypatch.setattr(type(experts), "expert_inference", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(type(experts), "grouped_forward", lambda *a: pytest.fail("inference ran grouped_forward"))
    with torch.inference_mode():
        y = dispatch(experts, x, decision)
    assert calls or not bool(decision.kept_mask().any())
    monkeypatch.undo()
    with torch.no_grad():
        ref = dispatch_reference(experts, x, decision)
    torch.testing.assert_close(y, _training_path(experts, x, decision), **TOL[dtype])
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_expert_runs_cut_groups_at_the_row_limit() -> None:
    groups = [(0, 0, 3), (2, 3, 4), (5, 4, 11), (7, 11, 12)]
    runs = inference.expert_runs(groups, 4)
    assert runs == [[(0, 0, 3), (2, 3, 4)], [(5, 4, 7)], [(5, 7, 11)], [(7, 11, 12)]]
    assert all(sum(b - a for _, a, b in run) <= 4 for run in runs)
    assert inference.expert_runs(groups, 100) == [groups]
    assert inference.expert_runs([], 4) == []
    # a group that fits a run is not cut across two (each cut costs another pass over its weights)
    assert inference.expert_runs([(0, 0, 3), (1, 3, 6)], 4) == [[(0, 0, 3)], [(1, 3, 6)]]


def test_expert_runs_cut_a_large_group_into_the_fewest_equal_pieces() -> None:
    """Mixtral's fp32 experts at T=4096: about 1000 rows each, 877 a run. A large group is not cut where the
    run before it ends (a fragment: another pass over its weights, a small GEMM)."""
    runs = inference.expert_runs([(0, 0, 800), (1, 800, 1837), (2, 1837, 1900)], 877)
    assert runs == [[(0, 0, 800)], [(1, 800, 1318)], [(1, 1318, 1837), (2, 1837, 1900)]]
    groups = [(e, 1000 * e, 1000 * e + 990 + 13 * e) for e in range(8)]
    pieces = [p for run in inference.expert_runs(groups, 877) for p in run]
    for e, start, end in groups:
        sizes = [b - a for g, a, b in pieces if g == e]
        assert sum(sizes) == end - start and len(sizes) == 2 and max(sizes) - min(sizes) <= 1, (e, sizes)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bank", ["mlp", "glu"])
def test_prefill_in_bounded_runs_equals_reference(bank, packed, monkeypatch) -> None:
    """Runs of a few rows (groups cut mid-expert), on the sorted grouped GEMM and on the expert loop,
    give the reference's output; without the cap, everything is one run."""
    torch.manual_seed(0)
    experts = BANKS[bank](4, torch.float32)
    if packed:
        pack_for_inference(experts)
        monkeypatch.setattr(inference, "PACKED_MIN_EXPERT_BYTES", 0)
    decision = _decision(40, 4, 2, kept=True)
    x = torch.randn(40, D)
    seen = []
    runs = inference.expert_runs
    monkeypatch.setattr(inference, "expert_runs", lambda g, m: seen.append(runs(g, m)) or seen[-1])
    widest = 2 * 24 if bank == "glu" else 24  # [gate; up] outputs 2F values per row, the MLP's up F
    monkeypatch.setattr(inference, "RUN_BYTES", 7 * widest * 4)  # 7 rows of fp32
    monkeypatch.setattr(inference, "native_layer", lambda *a, **k: None)  # the expert loop, not the one native call
    with torch.inference_mode():
        y = dispatch(experts, x, decision)
    assert len(seen[-1]) > 4 and max(sum(b - a for _, a, b in run) for run in seen[-1]) <= 7
    torch.testing.assert_close(y, dispatch_reference(experts, x, decision), rtol=1e-5, atol=1e-5)
