"""Compression: low-rank + structured-sparse experts, the global cubic-schedule pruner, cost accounting,
the packed form (only kept residual rows) and its checkpoints."""

import json
import struct
from pathlib import Path

import pytest
import torch

import moekit
from moekit.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, save_checkpoint
from moekit.experts import dispatch, dispatch_reference
from moekit.merging import merge_moekit_model
from moekit.merging.compress import LowRankSparseExperts, StructuredPruner, compress_experts, cubic_ratio
from moekit.merging.cost import count_parameters, expert_flops_per_token, lm_flops_per_token
from moekit.merging.packed import PackedLowRankSparseExperts, pack_compressed
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
    packed = pack_compressed(compressed)  # after pruning: same function, same cost, S stored by kept rows
    assert isinstance(packed.blocks[0].moe.experts, PackedLowRankSparseExperts)
    assert isinstance(compressed.blocks[0].moe.experts, LowRankSparseExperts)  # input untouched
    with torch.no_grad():
        torch.testing.assert_close(packed.eval()(data[:, :-1])[0], compressed.eval()(data[:, :-1])[0])
    assert count_parameters(packed) == count_parameters(compressed) == sum(p.numel() for p in packed.parameters())
    assert lm_flops_per_token(packed, 16) == lm_flops_per_token(compressed, 16)
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


def _masked(kind: str, seed: int = 0) -> LowRankSparseExperts:
    """A pruned bank: random kept rows, one expert with no kept row in one matrix, biases for mlp."""
    torch.manual_seed(seed)
    bank = LowRankSparseExperts.from_bank(_bank(kind), 3)
    with torch.no_grad():
        for m in bank.matrices:
            mask = getattr(bank, f"{m}_mask")
            mask.copy_((torch.rand_like(mask) < 0.3).to(mask))
        bank.down_proj_mask[2] = 0
        bank.down_proj_mask[0, 0] = 1
    return bank


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("combine", ["sparse", "dense"])
def test_packed_matches_masked_outputs_and_gradients(kind: str, combine: str) -> None:
    masked = _masked(kind)
    packed = PackedLowRankSparseExperts.from_masked(masked)
    assert packed.kept_rows["down_proj"][2] == 0 and count_parameters(packed) == masked.parameter_count()
    assert torch.equal(packed.flops_per_token_E(), masked.flops_per_token_E())
    router = moekit.TopKRouter(8, 4, 2, noisy=False)
    x = torch.randn(30, 8)
    with torch.no_grad():
        for m in masked.matrices:  # the packed dense view is U V + S * mask
            torch.testing.assert_close(packed.dense_weight(m), masked.dense_weight(m))
        for e in range(4):  # the packed reference agrees with the masked one
            torch.testing.assert_close(packed.expert_forward(x, e), masked.expert_forward(x, e))
    outs, grads = [], []
    for bank in (masked, packed):
        xi = x.clone().requires_grad_(True)
        y = moekit.MoE(router, bank, combine=combine)(xi).y
        g = torch.autograd.grad(y, [xi, *bank.parameters()], torch.ones_like(y))
        outs.append(y)
        grads.append(dict(zip(["x", *(n for n, _ in bank.named_parameters())], g)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    gm, gp = grads
    for name in gp:
        if name.endswith("_s"):  # the packed S gradient is the masked one's kept rows; pruned rows get none
            m = name[:-2]
            index = getattr(packed, f"{m}_index").long()
            torch.testing.assert_close(gp[name], gm[name].reshape(-1, gm[name].shape[-1])[index], rtol=1e-4, atol=1e-5)
            assert bool((gm[name] * (1 - getattr(masked, f"{m}_mask")).unsqueeze(-1) == 0).all())
        else:
            torch.testing.assert_close(gp[name], gm[name], rtol=1e-4, atol=1e-5)
    # the packed fast path against the plain per-expert reference (outputs and gradients)
    xi = x.clone().requires_grad_(True)
    with torch.no_grad():
        decision = router(xi)
    y, ref = dispatch(packed, xi, decision), dispatch_reference(packed, xi, decision)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    params = [xi, *packed.parameters()]
    for a, b in zip(
        torch.autograd.grad(y, params, torch.ones_like(y)), torch.autograd.grad(ref, params, torch.ones_like(ref))
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_bank_keeps_s_in_the_graph_without_tokens_and_refuses_other_groupings() -> None:
    packed = PackedLowRankSparseExperts.from_masked(_masked("glu"))
    y = packed.grouped_forward(torch.zeros(0, 8), packed.stacked_parameters(), torch.zeros(4, dtype=torch.long))
    y.sum().backward()
    assert y.shape == (0, 8) and all(p.grad is not None for p in packed.parameters())
    with pytest.raises(ValueError, match="one group per expert"):
        packed.grouped_forward(torch.zeros(3, 8), packed.stacked_parameters(), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="needs a dense bank"):
        packed.merge_parameters(torch.ones(2, 4) / 4)
    with pytest.raises(ValueError, match=r"kept_rows\['down_proj'\] must be 4 ints in \[0, 8\]"):
        PackedLowRankSparseExperts(4, 8, 12, kept_rows={"gate_up_proj": [1] * 4, "down_proj": [9, 0, 0, 0]})
    with pytest.raises(ValueError, match="no LowRankSparseExperts to pack"):
        pack_compressed(moekit.MoELM(dim=8, depth=1, heads=1, max_seq_len=4, num_experts=2, hidden=8))


def _compressed_lm(keep: float, experts: str = "glu") -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A merged (exact form, 8 -> 2 experts per layer) MoELM and its compressed copy keeping the
    first ``keep`` fraction of every expert's residual rows."""
    torch.manual_seed(0)
    model = moekit.MoELM(dim=32, depth=2, heads=2, max_seq_len=16, num_experts=8, hidden=64, experts=experts).eval()
    x = torch.randint(0, 256, (4, 16))
    merged = merge_moekit_model(model, [x], experts=2, quiet=True)
    compressed = compress_experts(merged, 4).eval()
    with torch.no_grad():
        for bank in compressed.modules():
            if isinstance(bank, LowRankSparseExperts):
                for m in bank.matrices:
                    mask = getattr(bank, f"{m}_mask")
                    mask[:, round(keep * mask.shape[1]) :] = 0
    return merged, compressed, x


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and the JSON header)."""
    raw = (path / WEIGHTS_NAME).read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("experts", ["glu", "mlp"])
def test_packed_checkpoint_round_trips_and_shrinks_with_the_kept_fraction(tmp_path: Path, experts: str) -> None:
    merged, _, x = _compressed_lm(1.0, experts)
    merged_dir = save_checkpoint(merged, tmp_path / "merged")
    sizes = {}
    for keep in (0.5, 0.1):
        _, compressed, _ = _compressed_lm(keep, experts)
        packed = pack_compressed(compressed)
        path = save_checkpoint(packed, tmp_path / f"packed-{keep}")
        meta = json.loads((path / CONFIG_NAME).read_text())
        assert [c["kept_rows"] for c in meta["config"]["compressed"]] == [
            b.moe.experts.compression_layout()["kept_rows"] for b in packed.blocks
        ]
        reloaded = load_checkpoint(path).eval()
        assert isinstance(reloaded.blocks[1].moe.experts, PackedLowRankSparseExperts)
        with torch.no_grad():
            assert torch.equal(reloaded(x)[0], packed(x)[0])
            torch.testing.assert_close(reloaded(x)[0], compressed(x)[0])
        # the file holds the stored parameters (fp32), a 4-byte index per kept row, and the exact-form maps
        rows = sum(
            getattr(b, f"{m}_index").numel()
            for b in packed.modules()
            if isinstance(b, PackedLowRankSparseExperts)
            for m in b.matrices
        )
        maps = sum(8 * b.moe.expert_map.numel() for b in packed.blocks if hasattr(b.moe, "expert_map"))
        assert _data_bytes(path) == 4 * count_parameters(packed) + 4 * rows + maps
        size = (path / WEIGHTS_NAME).stat().st_size
        assert size - _data_bytes(path) < 8192  # the rest is the safetensors JSON header
        sizes[keep] = size
    merged_bytes = (merged_dir / WEIGHTS_NAME).stat().st_size
    assert _data_bytes(merged_dir) == 4 * count_parameters(merged) + maps
    assert sizes[0.1] < sizes[0.5] < merged_bytes


def test_dense_masked_compressed_model_also_round_trips(tmp_path: Path) -> None:
    _, compressed, x = _compressed_lm(0.25)
    path = save_checkpoint(compressed, tmp_path / "masked")
    assert json.loads((path / CONFIG_NAME).read_text())["config"]["compressed"][0] == {"rank": 4, "kept_rows": None}
    reloaded = load_checkpoint(path).eval()
    assert isinstance(reloaded.blocks[0].moe.experts, LowRankSparseExperts)
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], compressed(x)[0])


def _edit_config(path: Path, edit) -> None:
    meta = json.loads((path / CONFIG_NAME).read_text())
    edit(meta["config"])
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def test_packed_checkpoint_with_a_wrong_config_fails_clearly(tmp_path: Path) -> None:
    _, compressed, _ = _compressed_lm(0.25)
    with torch.no_grad():  # uneven kept rows, so a config with the same total but another split exists
        compressed.blocks[0].moe.experts.down_proj_mask[0, 20] = 1
    path = save_checkpoint(pack_compressed(compressed), tmp_path / "packed")
    kept = json.loads((path / CONFIG_NAME).read_text())["config"]["compressed"][0]["kept_rows"]["down_proj"]
    assert kept[0] == kept[1] + 1

    def swap(cfg):  # same number of rows, other experts: shapes fit, the index does not
        cfg["compressed"][0]["kept_rows"]["down_proj"] = kept[::-1]

    _edit_config(path, swap)
    with pytest.raises(ValueError, match=r"blocks.0.moe.experts.down_proj_index does not match the layout"):
        load_checkpoint(path)

    def more(cfg):
        cfg["compressed"][0]["kept_rows"]["down_proj"] = [k + 1 for k in kept]

    _edit_config(path, more)
    with pytest.raises(
        ValueError, match=r"do not match its config \('moe_lm'\): tensors of another shape .*blocks.0.moe.experts.down_proj_s"
    ):
        load_checkpoint(path)
    _edit_config(path, lambda cfg: cfg.pop("compressed"))
    with pytest.raises(ValueError, match=r"do not match its config \('moe_lm'\): .*unexpected tensors .*down_proj_index"):
        load_checkpoint(path)

    def bad(cfg):
        cfg["compressed"] = [{"rank": 4, "kept_rows": {"down_proj": [1, 1]}}, None]

    _edit_config(path, bad)
    with pytest.raises(
        ValueError, match=r"compressed\[0\]: kept_rows must map each of \['gate_up_proj', 'down_proj'\]"
    ):
        load_checkpoint(path)
