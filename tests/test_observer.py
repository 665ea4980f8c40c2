"""The layer-wise observer's statistics against naive reference computations: weighted reservoirs,
calibration mixing (every set counts, in proportion to its weight), REAP's gate variants, the
NAEE layer cache and down_proj extremes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.merging import calibrate
from moekit.merging.observer import WeightedBatch, mix_calibration
from moekit.merging.statistics import Reservoir
from moekit.models.lm import MoELM


def _lm(seed: int = 0, **kw) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(**{"dim": 16, "depth": 2, "heads": 2, "max_seq_len": 16, "num_experts": 4, "k": 2, "hidden": 24, **kw}).eval()


def _batches(n: int, seed: int, rows: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, 16), generator=gen) for _ in range(n)]


def test_reservoir_keeps_every_row_in_order_while_it_fits_and_a_seeded_subset_after():
    rows = torch.arange(30.0).unsqueeze(1)
    small = Reservoir(64, seed=1)
    for part in rows.split(7):
        small.add(part)
    assert torch.equal(small.result(1), rows)  # the first rows, in order: what M-SMoE saw before
    a, b = Reservoir(10, seed=3), Reservoir(10, seed=3)
    for part in rows.split(7):
        a.add(part)
        b.add(part)
    got = a.result(1).flatten()
    assert got.shape == (10,) and torch.equal(got, b.result(1).flatten())
    assert torch.all(got[1:] > got[:-1])  # a subset, in arrival order
    other = Reservoir(10, seed=4)
    for part in rows.split(7):
        other.add(part)
    assert not torch.equal(other.result(1).flatten(), got)


def test_weighted_reservoir_never_keeps_weight_zero_and_favours_heavy_rows():
    r = Reservoir(8, seed=0)
    r.add(torch.zeros(50, 1), 0.0)
    r.add(torch.ones(5, 1), 1.0)
    assert torch.equal(r.result(1), torch.ones(5, 1))
    picks = []
    for seed in range(40):
        r = Reservoir(4, seed=seed)
        r.add(torch.zeros(20, 1), 1.0)
        r.add(torch.ones(20, 1), 9.0)
        picks.append(float(r.result(1).mean()))
    assert sum(picks) / len(picks) > 0.75  # 9:1 weights -> most samples from the heavy rows


def test_mix_calibration_weights_each_set_by_its_weight_not_its_size():
    a, b = _batches(2, seed=1), _batches(1, seed=2)
    mixed = mix_calibration([(a, 3.0), (b, 1.0)])
    assert [m.weight for m in mixed] == [3 / 4 * 96 / 64] * 2 + [1 / 4 * 96 / 32]  # 64 + 32 tokens
    model = _lm()
    counts = lambda batches: calibrate(model, batches, statistics={"counts": {}})
    ca, cb, cm = counts(a), counts(b), counts(mixed)
    for name in cm:
        per_token_a = ca[name]["counts"]["counts"] / 64
        per_token_b = cb[name]["counts"]["counts"] / 32
        expect = 96 * (0.75 * per_token_a + 0.25 * per_token_b)  # 96 tokens in all, 3:1 per-token share
        assert torch.allclose(cm[name]["counts"]["counts"], expect)
        assert float(cm[name]["counts"]["weight"]) == 96.0
        assert not torch.allclose(cm[name]["counts"]["counts"], cb[name]["counts"]["counts"] * 3)  # not the last set only


def test_mix_calibration_refuses_bad_weights():
    import pytest

    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="weight of calibration set 0"):
            mix_calibration([(_batches(1, 0), bad)])
    with pytest.raises(ValueError, match="at least one"):
        mix_calibration([])


def _reference_layer(model: MoELM, batches: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Each MoE layer's inputs ``[T, D]`` on the calibration batches (forward pre-hooks)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.blocks))}
    hooks = [b.moe.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, b in enumerate(model.blocks)]  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in hooks:
        h.remove()
    return seen


def _expert(model: MoELM, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
    bank = model.blocks[layer].moe.experts
    gate, up = (x @ bank.gate_up_proj[e].t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ bank.down_proj[e].t()


def test_expert_output_norms_match_a_token_by_token_reference():
    model, batches = _lm(seed=5), _batches(2, seed=6)
    stats = calibrate(model, batches, statistics={"expert_output_norms": {}, "down_proj_extremes": {}})
    inputs = _reference_layer(model, batches)
    for i, block in enumerate(model.blocks):
        x = torch.cat(inputs[i]).double()
        logits = (x @ block.moe.router.gate.weight.double().t())
        probs = torch.softmax(logits, -1)
        top, ids = logits.topk(2, dim=-1)
        want = {k: torch.zeros(4, dtype=torch.float64) for k in ("counts", "norm_sums", "prob_norm_sums", "renorm_norm_sums", "gated_norm_sums")}
        abs_max = torch.zeros(4, dtype=torch.float64)
        for t in range(x.shape[0]):
            chosen = probs[t, ids[t]]
            for slot in range(2):
                e = int(ids[t, slot])
                y = _expert(model, i, e, x[t:t + 1].float()).double()[0]
                n = y.norm()
                want["counts"][e] += 1
                want["norm_sums"][e] += n
                want["prob_norm_sums"][e] += probs[t, e] * n
                want["renorm_norm_sums"][e] += probs[t, e] / chosen.sum() * n
                want["gated_norm_sums"][e] += torch.softmax(top[t], -1)[slot] * n  # moekit top-k renormalises
                abs_max[e] = max(abs_max[e], y.abs().max())
        got = stats[f"blocks.{i}.moe"]
        for k, v in want.items():
            assert torch.allclose(got["expert_output_norms"][k], v, rtol=1e-5), k
        assert torch.allclose(got["down_proj_extremes"]["abs_max"], abs_max, rtol=1e-5)


def test_layer_io_rebuilds_the_block_output_and_padding_is_left_out():
    from moekit.merging.grouping import expert_outputs
    from moekit.merging.moekit_blocks import read_moe_layer

    model, batches = _lm(seed=2), _batches(1, seed=3)
    stats = calibrate(model, batches, statistics={"layer_io": {"max_tokens": 10_000}})
    inputs = _reference_layer(model, batches)
    for i, block in enumerate(model.blocks):
        io = stats[f"blocks.{i}.moe"]["layer_io"]
        assert torch.allclose(io["inputs"], torch.cat(inputs[i]))
        outs = expert_outputs(read_moe_layer(block.moe), io["inputs"])
        dense = torch.zeros(io["inputs"].shape[0], 4).scatter_add(1, io["ids"], io["gates"])
        with torch.no_grad():
            want = block.moe(torch.cat(inputs[i]).unsqueeze(0)).y[0]
        assert torch.allclose(torch.einsum("te,etd->td", dense, outs), want, atol=1e-5)


def test_weighted_batch_scales_sums_but_not_maxima():
    model, batches = _lm(seed=1), _batches(1, seed=9)
    plain = calibrate(model, batches, statistics={"counts": {}, "expert_output_norms": {}, "down_proj_extremes": {}})
    heavy = calibrate(model, [WeightedBatch(batches[0], 2.5)],
                      statistics={"counts": {}, "expert_output_norms": {}, "down_proj_extremes": {}})  # fmt: skip
    for name in plain:
        assert torch.allclose(heavy[name]["counts"]["counts"], 2.5 * plain[name]["counts"]["counts"])
        assert torch.allclose(heavy[name]["expert_output_norms"]["norm_sums"], 2.5 * plain[name]["expert_output_norms"]["norm_sums"])
        assert torch.equal(heavy[name]["down_proj_extremes"]["abs_max"], plain[name]["down_proj_extremes"]["abs_max"])
