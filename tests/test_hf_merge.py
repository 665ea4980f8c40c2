"""Merging Hugging Face MoE models: plain form (stock reload), exact form (redirect semantics), errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILY_NAMES, NUM_EXPERTS, generate, logits, model_class, tiny_model, token_batches  # noqa: E402

from moekit import RoutingRecorder  # noqa: E402
from moekit.merging import calibrate  # noqa: E402
from moekit.integrations.hf import (  # noqa: E402
    family_for,
    load_hf_model,
    merge_hf_model,
    routing_sources,
    save_hf_model,
)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _expert_params(model) -> int:
    """Parameters of one expert in one block, with its router row (weight, bias; buffers such as
    ``e_score_correction_bias`` are not parameters)."""
    fam = family_for(model)
    w = fam.read_layer(next(iter(fam.blocks(model).values())), model.config)
    block = next(iter(fam.blocks(model).values()))
    router_row = sum(p.numel() // fam.router_outputs(block) for p in fam.router(block).parameters())
    return sum(p[0].numel() for p in w.params.values()) + router_row


def _plain_experts(model) -> int:
    """Experts per block for the plain-form test: 2, or 4 under group-limited routing (2 groups)."""
    fam = family_for(model)
    return 4 if fam.routing(next(iter(fam.blocks(model).values())), model.config).groups > 1 else 2


def _redirect_model(original, merged):
    """The original model with every expert replaced by its group's merged expert (E experts, router
    unchanged): what the exact form must compute."""
    fam = family_for(original)
    redirect = copy.deepcopy(original)
    merged_blocks = fam.blocks(merged)
    for name, block in fam.blocks(redirect).items():
        if fam.is_remapped(merged_blocks[name]):
            expert_map = getattr(merged_blocks[name], fam.router_attr).expert_map
            params = fam.read_experts(merged_blocks[name])
            fam.write_experts(block, {k: v[expert_map].clone() for k, v in params.items()})
    return redirect


def _decisions(model, ids):
    with torch.no_grad(), RoutingRecorder(model, sources=routing_sources(model), keep_logits=True) as rec:
        logits(model, ids)
    return {n: (s.counts_E.clone(), s.logits_TE()) for n, s in rec.stats.items()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plain_form_reloads_with_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    ids = token_batches(1, batch=2, seq=10, seed=7)[0]
    G = _plain_experts(model)
    merged = merge_hf_model(model, token_batches(), experts=G, form="plain", quiet=True)
    save_hf_model(model, tmp_path / "orig")
    save_hf_model(merged, tmp_path / "merged")
    reloaded = model_class(family).from_pretrained(tmp_path / "merged").eval()  # stock transformers, no moekit
    fam = family_for(model)
    blocks = fam.blocks(reloaded)
    assert all(fam.num_experts(b) == G and fam.router(b).num_experts == G for b in blocks.values())
    assert getattr(reloaded.config, fam.experts_key) == G
    assert _params(reloaded) == _params(model) - len(blocks) * (NUM_EXPERTS - G) * _expert_params(model)
    assert _weights_bytes(tmp_path / "merged") < 0.9 * _weights_bytes(tmp_path / "orig")
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), atol=1e-5, rtol=1e-5)
        out = generate(reloaded, ids)
    assert out.shape[0] == 2 and out.shape[1] > (1 if family == "switch_transformers" else ids.shape[1])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exact_form_is_the_redirect_model(family, tmp_path):
    model = tiny_model(family)
    ids = token_batches(1, batch=2, seq=10, seed=7)[0]
    grouped = _plain_experts(model) == 4  # group-limited routing: counts fitted to multiples of n_group
    merged = merge_hf_model(model, token_batches(), experts=4 if grouped else 3, form="exact", quiet=True)
    fam = family_for(model)
    counts = [fam.num_experts(b) for b in fam.blocks(merged).values()]
    assert all(1 <= c < NUM_EXPERTS for c in counts)
    assert all(c % 2 == 0 for c in counts) if grouped else sum(counts) == 3 * len(counts)  # global budget
    for name, block in fam.blocks(model).items():  # routers unchanged
        assert torch.equal(fam.read_router(fam.blocks(merged)[name])[0], fam.read_router(block)[0])
    redirect = _redirect_model(model, merged)
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, ids), logits(redirect, ids), atol=1e-5, rtol=1e-5)
    got, want = _decisions(merged, ids), _decisions(redirect, ids)
    for name in want:  # the same router decisions over all E router outputs
        assert torch.equal(got[name][0], want[name][0])
        torch.testing.assert_close(got[name][1], want[name][1], atol=1e-5, rtol=1e-5)
    first = next(iter(want))  # the first MoE block sees the original input: original decisions
    assert torch.equal(got[first][0], _decisions(model, ids)[first][0])

    save_hf_model(model, tmp_path / "orig")
    save_hf_model(merged, tmp_path / "exact")
    assert _weights_bytes(tmp_path / "exact") < _weights_bytes(tmp_path / "orig")
    reloaded = load_hf_model(tmp_path / "exact").eval()
    assert _params(reloaded) == _params(merged) < _params(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), atol=1e-5, rtol=1e-5)
        assert generate(reloaded, ids).shape[0] == 2
    # stock transformers refuses the exact layout with an error that names moekit's loader (Switch
    # would otherwise load silently wrong, with re-initialised routers)
    with pytest.raises(ValueError, match=r"load it with moekit\.load_hf_model"):
        model_class(family).from_pretrained(tmp_path / "exact")
    assert "moekit.load_hf_model" in (tmp_path / "exact" / "README.md").read_text()


@pytest.mark.parametrize("form", ["exact", "plain"])
def test_identical_experts_merge_without_loss(form):
    """Mixtral renormalises its top-k weights, so with identical experts both forms are lossless."""
    model = tiny_model("mixtral")
    fam = family_for(model)
    with torch.no_grad():
        for block in fam.blocks(model).values():
            w = fam.read_layer(block, model.config)
            fam.write_experts(block, {k: v[:1].expand_as(v).clone() for k, v in w.params.items()})
    ids = token_batches(1, seed=3)[0]
    merged = merge_hf_model(model, token_batches(), experts=1, form=form, quiet=True)
    assert all(fam.num_experts(b) == 1 for b in fam.blocks(merged).values())
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prune", "uniform", "random"])
def test_other_methods_are_exact_redirects(method):
    model = tiny_model("olmoe")
    merged = merge_hf_model(model, token_batches(), experts=2, method=method, form="exact", budget="uniform")
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        want = logits(_redirect_model(model, merged), ids)
        torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=1e-5)


def test_input_model_is_not_modified():
    model = tiny_model("switch_transformers")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    for form in ("plain", "exact"):
        merge_hf_model(model, token_batches(), experts=2, form=form, quiet=True)
    assert model.config.to_dict() == config
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_inplace_merge_returns_the_model():
    model = tiny_model("mixtral")
    assert merge_hf_model(model, token_batches(), experts=2, inplace=True, quiet=True) is model
    assert model.config.num_local_experts == 2 and model.num_experts == 2


def test_qwen2_moe_shared_expert_is_left_as_is():
    model = tiny_model("qwen2_moe")
    merged = merge_hf_model(model, token_batches(), experts=2, quiet=True)
    before, after = model.state_dict(), merged.state_dict()
    shared = [k for k in before if "shared_expert" in k]
    assert shared and all(torch.equal(before[k], after[k]) for k in shared)


def test_switch_plain_form_keeps_total_capacity():
    model = tiny_model("switch_transformers", expert_capacity=5)
    merged = merge_hf_model(model, token_batches(), experts=2, quiet=True)
    assert merged.config.expert_capacity == 15  # ceil(5 * 6 / 2)
    assert merged.encoder.config.expert_capacity == merged.decoder.config.expert_capacity == 15
    assert merged.encoder.config.num_experts == 2


def test_exact_form_excluded_blocks_stay_unmerged():
    model = tiny_model("olmoe")
    merged = merge_hf_model(model, token_batches(), experts=2, form="exact", exclude=["model.layers.0.mlp"], quiet=True)
    fam = family_for(merged)
    blocks = fam.blocks(merged)
    assert not fam.is_remapped(blocks["model.layers.0.mlp"]) and fam.num_experts(blocks["model.layers.0.mlp"]) == 6
    assert fam.num_experts(blocks["model.layers.1.mlp"]) == 2
    assert merged.config.moekit_merge["layers"] == {"model.layers.1.mlp": {"experts": 2, "router_outputs": 6}}


def test_bad_requests_are_clear_errors():
    model = tiny_model("mixtral")
    batches = token_batches(1)
    with pytest.raises(ValueError, match="experts must be <= 6, got 7"):
        merge_hf_model(model, batches, experts=7)
    with pytest.raises(ValueError, match="experts must be >= 1, got 0"):
        merge_hf_model(model, batches, experts=0)
    with pytest.raises(ValueError, match="form='plain' needs budget='uniform'"):
        merge_hf_model(model, batches, experts=2, form="plain", budget="global")
    with pytest.raises(ValueError, match="exclude names \\['nope'\\]"):
        merge_hf_model(model, batches, experts=2, form="exact", exclude=["nope"])
    with pytest.raises(ValueError, match="form must be one of"):
        merge_hf_model(model, batches, experts=2, form="folded")
    merged = merge_hf_model(model, batches, experts=2, form="exact", quiet=True)
    with pytest.raises(ValueError, match="already merged"):
        merge_hf_model(merged, batches, experts=1)


def test_calibration_that_never_reaches_a_block():
    model = tiny_model("switch_transformers")

    def encoder_only(m, ids):
        return m.get_encoder()(input_ids=ids)

    with pytest.raises(ValueError, match="never reached MoE blocks \\['decoder.block.0.layer.2.mlp'"):
        merge_hf_model(model, token_batches(1), experts=2, forward=encoder_only)
    with pytest.raises(ValueError, match="never reached"):
        calibrate(tiny_model("switch_transformers", expert_capacity=0), token_batches(1))  # every token dropped
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(model, [])


def test_save_hf_model_refuses_to_overwrite(tmp_path):
    model = tiny_model("olmoe")
    save_hf_model(model, tmp_path / "m")
    with pytest.raises(FileExistsError, match="already exists"):
        save_hf_model(model, tmp_path / "m")
    save_hf_model(model, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left


@pytest.mark.parametrize("form", ["plain", "exact"])
def test_router_aux_loss_still_works(form):
    model = tiny_model("mixtral")
    merged = merge_hf_model(model, token_batches(), experts=2, form=form, quiet=True)
    ids = token_batches(1)[0]
    out = merged(input_ids=ids, labels=ids, output_router_logits=True)
    E = 2 if form == "plain" else NUM_EXPERTS  # the router logits the loss sees
    assert all(r.shape[-1] == E for r in out.router_logits)
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)


def test_exact_loader_refuses_a_checkpoint_that_does_not_match_its_config(tmp_path):
    import json

    merged = merge_hf_model(tiny_model("switch_transformers"), token_batches(), experts=2, form="exact", quiet=True)
    save_hf_model(merged, tmp_path / "exact")
    config = json.loads((tmp_path / "exact" / "config.json").read_text())
    config["moekit_merge"]["layers"].pop("decoder.block.1.layer.2.mlp")
    (tmp_path / "exact" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the model: .*decoder.block.1.layer.2.mlp"):
        load_hf_model(tmp_path / "exact")
