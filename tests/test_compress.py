"""Compression: low-rank + structured-sparse experts, the global cubic-schedule pruner, cost accounting."""

import pytest
import torch

import moekit
from moekit.experts import dispatch, dispatch_reference
from moekit.merging.compress import LowRankSparseExperts, StructuredPruner, compress_experts, cubic_ratio
from moekit.merging.cost import count_parameters, expert_flops_per_token, lm_flops_per_token
from moekit.models.lm_train import train_lm


def _bank(kind: str) -> moekit.ExpertBank:
    return moekit.GLUExperts(4, 8, 12) if kind == "glu" else moekit.MLPExperts(4, 8, 12)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_factorisation_starts_as_the_same_function(kind: str, rank: int) -> None:
    bank = _bank(kind)
    compressed = LowRankSparseExperts.from_bank(bank, rank)
    x = torch.randn(10, 8)
    with torch.no_grad():
        for e in range(4):
            torch.testing.assert_close(compressed.expert_forward(x, e), bank.expert_forward(x, e), rtol=1e-4, atol=1e-5)
    for m in compressed.matrices:  # the low-rank part is the truncated SVD of W
        u, v = getattr(compressed, f"{m}_u"), getattr(compressed, f"{m}_v")
        assert u.shape[-1] == min(rank, *getattr(bank, m).shape[1:]) and v.shape[-2] == u.shape[-1]


@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_factorised_dispatch_matches_reference_outputs_and_gradients(kind: str) -> None:
    compressed = LowRankSparseExperts.from_bank(_bank(kind), 3)
    with torch.no_grad():
        compressed.down_proj_mask[1, :3] = 0  # some pruned rows
    router = moekit.TopKRouter(8, 4, 2, noisy=False)
    x = torch.randn(20, 8, requires_grad=True)
    with torch.no_grad():
        decision = router(x)
    y, ref = dispatch(compressed, x, decision), dispatch_reference(compressed, x, decision)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    params = [x, *compressed.parameters()]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cubic_schedule() -> None:
    ratios = [cubic_ratio(t, 100, 0.1, 10, 20) for t in range(100)]
    assert ratios[:10] == [1.0] * 10 and ratios[80:] == [0.1] * 20
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
    assert cubic_ratio(45, 100, 0.1, 10, 20) == pytest.approx(0.1 + 0.9 * 0.5**3)


def test_pruner_keeps_the_global_fraction_and_shrinks_cost() -> None:
    model = moekit.MoELM(dim=16, depth=2, heads=2, max_seq_len=16, num_experts=4, k=2, hidden=32)
    compressed = compress_experts(model, 4)
    assert isinstance(compressed.blocks[0].moe.experts, LowRankSparseExperts)
    assert not isinstance(model.blocks[0].moe.experts, LowRankSparseExperts)  # input untouched
    pruner = StructuredPruner(compressed, steps=6, final_ratio=0.25, initial_warmup=1, final_warmup=2)
    data = torch.randint(0, 256, (4, 17))
    before_params, before_flops = count_parameters(compressed), lm_flops_per_token(compressed, 16)
    train_lm(compressed, lambda s: data, steps=6, teacher=model, after_step=pruner.step, quiet=True)
    banks = pruner.banks
    total = sum(getattr(b, f"{m}_s").numel() for b in banks for m in b.matrices)
    kept = sum(b.kept_residual_entries() for b in banks)
    max_row = max(getattr(b, f"{m}_s").shape[-1] for b in banks for m in b.matrices)
    assert 0.25 * total - max_row <= kept <= 0.25 * total
    assert count_parameters(compressed) == before_params - (total - kept)
    assert lm_flops_per_token(compressed, 16) < before_flops
    # pruned rows have no effect: zeroing them in S changes nothing
    x = torch.randn(5, 16)
    bank = banks[0]
    with torch.no_grad():
        y = bank.expert_forward(x, 0)
        for m in bank.matrices:
            getattr(bank, f"{m}_s").mul_(getattr(bank, f"{m}_mask").unsqueeze(-1))
        torch.testing.assert_close(bank.expert_forward(x, 0), y)


def test_cost_accounting_of_standard_banks() -> None:
    assert expert_flops_per_token(moekit.GLUExperts(2, 8, 12)) == 2 * 3 * 8 * 12
    assert expert_flops_per_token(moekit.MLPExperts(2, 8, 12)) == 2 * 2 * 8 * 12
    model = moekit.MoELM(dim=16, depth=1, heads=2, max_seq_len=8, num_experts=4, k=2, hidden=32)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    expected = 2 * 4 * 16 * 16 + 2 * 2 * 16 * 4.5 + 2 * 16 * 4 + 2 * (2 * 3 * 16 * 32) + 2 * 16 * 256
    assert lm_flops_per_token(model, 8) == pytest.approx(expected)


def test_compression_errors() -> None:
    with pytest.raises(TypeError, match="GLUExperts or MLPExperts"):
        LowRankSparseExperts(moekit.AdapterExperts(2, 8, 4), 2)
    with pytest.raises(ValueError, match="no LowRankSparseExperts"):
        StructuredPruner(moekit.MoELM(dim=8, depth=1, heads=1, max_seq_len=4, num_experts=2, hidden=8), steps=3)
