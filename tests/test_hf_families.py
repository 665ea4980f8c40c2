"""Hugging Face family adapters: structure, read/write round trips, layout equivalence, routing sources."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILY_NAMES, NUM_EXPERTS, logits, tiny_model, token_batches  # noqa: E402

from moekit import RoutingRecorder  # noqa: E402
from moekit.experts.dispatch import dispatch  # noqa: E402
from moekit.experts.mlp import GLUExperts, MLPExperts  # noqa: E402
from moekit.integrations.hf import family_for, list_families, routing_sources  # noqa: E402


def test_families_registered():
    assert set(FAMILY_NAMES) <= set(list_families())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_moe_blocks_found(family):
    model = tiny_model(family)
    found = family_for(model).blocks(model)
    assert len(found) == (4 if family == "switch_transformers" else 2)
    assert all(family_for(model).num_experts(b) == NUM_EXPERTS for b in found.values())


def test_qwen2_moe_dense_layers_are_not_blocks():
    model = tiny_model("qwen2_moe", mlp_only_layers=[0])
    assert list(family_for(model).blocks(model)) == ["model.layers.1.mlp"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_read_layer_layout(family):
    model = tiny_model(family)
    fam = family_for(model)
    w = fam.read_layer(next(iter(fam.blocks(model).values())), model.config)
    D = 32
    if family == "switch_transformers":
        assert w.kind == "mlp" and w.activation == "relu"
        assert w.params["up_proj"].shape == (NUM_EXPERTS, 48, D) and w.params["down_proj"].shape == (NUM_EXPERTS, D, 48)
    else:
        F = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
        assert w.kind == "glu" and w.activation == ("gpt_oss_swiglu" if family == "gpt_oss" else "silu")
        assert w.params["gate_up_proj"].shape == (NUM_EXPERTS, 2 * F, D)
        assert w.params["down_proj"].shape == (NUM_EXPERTS, D, F)
    assert w.router_weight.shape == (NUM_EXPERTS, D)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layout_matches_moekit_bank(family):
    """The HF experts module and a moekit bank built from ``read_layer`` compute the same combine."""
    model = tiny_model(family)
    fam = family_for(model)
    block = next(iter(fam.blocks(model).values()))
    w = fam.read_layer(block, model.config)
    E, F = w.num_experts, w.params["down_proj"].shape[-1]
    bank = None
    if w.kind == "glu" and w.activation != "gpt_oss_swiglu":
        bank = GLUExperts(E, 32, F, activation=w.activation)
    elif w.kind == "mlp":
        bank = MLPExperts(E, 32, F, activation=w.activation, bias="up_bias" in w.params)
    if bank is not None:
        bank.load_state_dict({k: v.clone() for k, v in w.params.items()}, strict=True)
    x_BSD = torch.randn(3, 5, 32)
    x_TD = x_BSD.reshape(-1, 32)
    with torch.no_grad():
        if family == "switch_transformers":
            out = fam.router(block)(x_BSD)
            y_hf = block.experts(x_TD, out[0].reshape(-1, 1, E), out[1].reshape(-1, 1))
        else:
            out = fam.router(block)(x_TD)
            y_hf = block.experts(x_TD, out[2], out[1])
        decision = fam.decision(out)
        if bank is not None:
            y_mk = dispatch(bank, x_TD, decision)
        else:  # no moekit bank for this activation (GPT-OSS): the plain per-expert reference
            y_mk = torch.zeros_like(x_TD)
            for t in range(x_TD.shape[0]):
                for e, g in zip(decision.ids_TK[t].tolist(), decision.weights_TK[t]):
                    y_mk[t] += g * w.expert_forward(x_TD[t : t + 1], e)[0]
    torch.testing.assert_close(y_mk, y_hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_read_write_round_trip_is_exact(family):
    model = tiny_model(family)
    fam = family_for(model)
    ids = token_batches(1)[0]
    with torch.no_grad():
        before = logits(model, ids)
        for block in fam.blocks(model).values():
            w = fam.read_layer(block, model.config)
            params = {k: v.clone() for k, v in w.params.items()}
            fam.write_experts(block, params)
            again = fam.read_layer(block, model.config)
            assert all(torch.equal(again.params[k], params[k]) for k in params)
            assert torch.equal(again.router_weight, w.router_weight)
        assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_permuting_experts_and_router_rows_keeps_the_function(family):
    """Writing experts in another order together with the router rows (and per-expert router tensors
    such as ``e_score_correction_bias``) in that order (plain-form writer) leaves the model's function
    unchanged: expert ids and router rows are consistent. Group-limited routers permute within groups."""
    model = tiny_model(family)
    fam = family_for(model)
    ids = token_batches(1)[0]
    with torch.no_grad():
        before = logits(model, ids)
        for block in fam.blocks(model).values():
            groups = fam.routing(block, model.config).groups
            size = NUM_EXPERTS // groups
            perm = torch.cat([g * size + torch.randperm(size) for g in range(groups)])
            w = fam.read_layer(block, model.config)
            fam.write_experts(block, {k: v[perm].clone() for k, v in w.params.items()})
            bias = None if w.router_bias is None else w.router_bias[perm]
            fam.write_router(block, w.router_weight[perm].clone(), bias)
            fam.write_router_extras(block, {k: v[perm].clone() for k, v in w.router_extras.items()})
        torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_routing_sources_with_recorder(family):
    model = tiny_model(family)
    ids = token_batches(1, batch=2, seq=8)[0]
    sources = routing_sources(model)
    assert list(sources) == list(family_for(model).blocks(model))
    with torch.no_grad(), RoutingRecorder(model, sources=sources, keep_logits=True) as rec:
        logits(model, ids)
    k = 1 if family == "switch_transformers" else 2
    for name, stats in rec.stats.items():
        assert stats.tokens == ids.numel()
        assert stats.counts_E.sum() == pytest.approx(ids.numel() * k)  # capacity 64 drops nothing here
        assert stats.logits_TE().shape == (ids.numel(), NUM_EXPERTS)
    if family != "switch_transformers":  # the recorded logits are the model's own router logits
        with torch.no_grad():
            own = model(input_ids=ids, output_router_logits=True).router_logits
        for stats, ref in zip(rec.stats.values(), own):
            torch.testing.assert_close(stats.logits_TE(), ref.float())


def test_switch_capacity_drops_are_recorded():
    model = tiny_model("switch_transformers", expert_capacity=1)
    ids = token_batches(1, batch=2, seq=8)[0]
    with torch.no_grad(), RoutingRecorder(model, sources=routing_sources(model)) as rec:
        logits(model, ids)
    for stats in rec.stats.values():  # at most one token per expert and sequence survives
        assert stats.counts_E.sum() <= 2 * NUM_EXPERTS
        assert stats.counts_E.max() <= 2


def test_unknown_family_is_a_clear_error():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32)  # fmt: skip
    model = tf.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="model_type='llama'.*supported: .*mixtral"):
        routing_sources(model)


def test_import_moekit_does_not_import_transformers():
    code = (
        "import sys, moekit, moekit.integrations\n"
        "assert 'transformers' not in sys.modules\n"
        "assert callable(moekit.routing_sources) and callable(moekit.integrations.merge_hf_model)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prune_and_low_rank_on_every_family(family):
    """Frequency pruning runs on every family (plain form); the low-rank step with the whole residual kept
    (``keep_residual=1``: U V + S = W) computes what the pruned model computes, through the family's
    compressed experts; families that cannot hold them refuse up front."""
    from moekit.merging.lowrank import LowRankOptions
    from moekit.merging.pipeline import CompressionSpec, check_request, run_pipeline
    from moekit.integrations.hf import hf_stack

    ids = token_batches(1, seed=5)[0]
    pruned = tiny_model(family)
    spec = CompressionSpec(method="frequency", experts=4, budget="uniform", form="plain")
    run_pipeline(hf_stack(pruned), token_batches(2), spec)
    assert all(family_for(pruned).num_experts(b) == 4 for b in family_for(pruned).blocks(pruned).values())
    compressed = tiny_model(family)
    low = CompressionSpec(method="frequency", experts=4, budget="uniform", form="plain",
                          lowrank=LowRankOptions(rank=2, keep_residual=1.0))  # fmt: skip
    if not family_for(compressed).compressible:
        with pytest.raises(ValueError, match="not supported"):
            check_request(hf_stack(compressed), low)
        return
    run_pipeline(hf_stack(compressed), token_batches(2), low)
    from moekit.integrations.hf.compressed import CompressedExperts

    assert all(isinstance(b.experts, CompressedExperts) for b in family_for(compressed).blocks(compressed).values())
    with torch.no_grad():
        torch.testing.assert_close(logits(compressed, ids), logits(pruned, ids), atol=1e-4, rtol=1e-4)
