"""Every expert method against a naive reference on tiny models: hand-computable scores and
documented tie-breaking, REAP against the official formula on a token-id calibration file, NAEE
against brute-force forwards of every pruned layer, HC-SMoE against scipy's clustering, MoNE's
novices against a reference layer, and super experts that must survive."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.merging import calibrate, merge_moekit_model
from moekit.merging.methods import create_method, list_methods
from moekit.merging.methods._prune import prune_by_score, ranked
from moekit.merging.methods.hc_smoe import agglomerate
from moekit.merging.methods.mone import mone_scores
from moekit.merging.methods.protection import super_experts
from moekit.merging.methods.reap import reap_scores
from moekit.merging.moekit_blocks import read_moe_layer
from moekit.merging.pipeline import CompressionSpec
from moekit.merging.weights import ExpertLayerWeights, RoutingSpec
from moekit.models.lm import MoELM

NEW = ("ean", "reap", "mone", "hc-smoe", "nae", "random", "uniform", "frequency")


def _lm(seed: int = 0, **kw) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(**{"dim": 16, "depth": 2, "heads": 2, "max_seq_len": 16, "num_experts": 8, "k": 2, "hidden": 24, **kw}).eval()


def _batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 16), generator=gen) for _ in range(n)]


def _compress(model: MoELM, batches, method: str, experts, *, form: str = "plain", budget: str = "uniform",
              protect: bool = True, **options) -> tuple[MoELM, dict]:
    """A compressed copy of ``model`` and the pipeline's report (statistics of the original model)."""
    from moekit.merging.pipeline import moekit_stack, run_pipeline

    out = copy.deepcopy(model)
    spec = CompressionSpec(method=method, method_options=options, experts=experts, budget=budget, form=form,
                           propagate="original", protect_super_experts=protect)  # fmt: skip
    report = run_pipeline(moekit_stack(out), batches, spec)
    return out, report


def _weights(E: int = 4, D: int = 2, F_: int = 3, seed: int = 0) -> ExpertLayerWeights:
    g = torch.Generator().manual_seed(seed)
    params = {"up_proj": torch.randn(E, F_, D, generator=g), "down_proj": torch.randn(E, D, F_, generator=g)}
    return ExpertLayerWeights("mlp", params, torch.randn(E, D, generator=g), activation="relu")


def _layer_inputs(model: MoELM, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [b.moe.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, b in enumerate(model.blocks)]  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in hooks:
        h.remove()
    return [torch.cat(s) for s in seen]


# ----- shared pruning rule
def test_ranked_breaks_ties_towards_the_lower_id_and_keeps_protected_experts():
    s = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert ranked(s, 2).tolist() == [1, 2]
    assert ranked(s, 1).tolist() == [1]
    assert ranked(torch.zeros(4), 2).tolist() == [0, 1]
    assert ranked(s, 2, torch.tensor([False, False, False, True])).tolist() == [1, 3]
    with pytest.raises(ValueError, match="2 experts are protected super experts .* only 1 are kept"):
        ranked(s, 1, torch.tensor([True, False, False, True]))
    with pytest.raises(ValueError, match="NaN"):
        ranked(torch.tensor([0.0, float("nan")]), 1)


def test_prune_by_score_keeps_rows_and_redirects_pruned_choices_to_the_most_similar_column():
    w = _weights()
    logits = torch.randn(20, 4)
    logits[:, 0] = 2 * logits[:, 3]  # expert 0's column points like expert 3's
    r = prune_by_score(w, torch.tensor([0.0, 5.0, 4.0, 3.0]), 3, {"router_logits": {"logits": logits}})
    assert r.dominant.tolist() == [1, 2, 3]
    assert torch.equal(r.weights.router_weight, w.router_weight[[1, 2, 3]])
    assert torch.equal(r.weights.params["down_proj"], w.params["down_proj"][[1, 2, 3]])
    assert r.expert_map.tolist() == [2, 0, 1, 2]


# ----- scores by hand
def test_ean_and_reap_scores_by_hand():
    norms = {"counts": torch.tensor([2.0, 0.0, 1.0]), "norm_sums": torch.tensor([4.0, 0.0, 3.0]),
             "renorm_norm_sums": torch.tensor([1.0, 0.0, 3.0]), "prob_norm_sums": torch.tensor([0.5, 0.0, 1.0]),
             "gated_norm_sums": torch.tensor([0.75, 0.0, 2.0])}  # fmt: skip
    stats = {"expert_output_norms": norms}
    assert create_method("ean").scores(stats).tolist() == [4.0, 0.0, 3.0]
    assert create_method("ean", reduction="mean").scores(stats).tolist() == [2.0, 0.0, 3.0]
    assert reap_scores(norms).tolist() == [0.5, 0.0, 3.0]
    assert reap_scores(norms, "softmax").tolist() == [0.25, 0.0, 1.0]
    assert reap_scores(norms, "model").tolist() == [0.375, 0.0, 2.0]


def test_mone_score_is_output_spread_times_mean_gate_and_novices_are_mean_outputs():
    # expert 0 outputs {1, 3} (mean 2, var 1), expert 1 outputs {2, 2} (var 0), expert 2 never routed
    stats = {
        "expert_output_moments": {"sums": torch.tensor([[4.0], [4.0], [0.0]]), "squares": torch.tensor([[10.0], [8.0], [0.0]]),
                                  "counts": torch.tensor([2.0, 2.0, 0.0])},
        "gate_sums": {"gate_sums": torch.tensor([0.5, 0.9, 0.0]), "weight": torch.tensor(10.0)},
    }  # fmt: skip
    score, mean = mone_scores(stats)
    assert torch.allclose(score, torch.tensor([1 * 0.05, 0.0, 0.0], dtype=torch.float64))
    assert mean.flatten().tolist() == [2.0, 2.0, 0.0]
    w = ExpertLayerWeights("mlp", {"up_proj": torch.randn(3, 2, 1), "down_proj": torch.randn(3, 1, 2)}, torch.randn(3, 1))
    r = create_method("mone").reduce(w, stats, 1, RoutingSpec(top_k=1))
    assert r.dominant.tolist() == [0] and r.novice_mask.tolist() == [False, True, True]
    assert r.novices.flatten().tolist() == [0.0, 2.0, 0.0]


# ----- REAP against the official formula, calibration from a token-id file
@torch.no_grad()
def _official_reap(model: MoELM, batches: list[torch.Tensor], ratio: float) -> tuple[list[torch.Tensor], list[list[int]]]:
    """REAP's ``pruning_metrics.py`` by hand: per layer, selected = top-k of the raw logits, gate =
    softmax over all E renormalised over the selected, S_j = mean over routed tokens of gate * ||f_j||;
    prune int(E * ratio) lowest (ties: lower id survives)."""
    scores, kept = [], []
    for i, x in enumerate(_layer_inputs(model, batches)):
        x = x.detach()
        block = model.blocks[i].moe
        E = block.router.num_experts
        logits = (x @ block.router.gate.weight.t()).float()
        probs = torch.softmax(logits, dim=-1)
        ids = logits.topk(block.router.k, dim=-1).indices
        gate = probs / probs.gather(1, ids).sum(1, keepdim=True)
        total, count = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        bank = block.experts
        for e in range(E):
            routed = (ids == e).any(1)
            g, u = (x[routed] @ bank.gate_up_proj[e].t()).chunk(2, -1)
            y = (F.silu(g) * u) @ bank.down_proj[e].t()
            total[e] = (gate[routed, e].double() * y.double().norm(dim=-1)).sum()
            count[e] = routed.sum()
        s = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        n_prune = int(E * ratio)
        order = sorted(range(E), key=lambda j: (-float(s[j]), j))
        scores.append(s)
        kept.append(sorted(order[: E - n_prune]))
    return scores, kept


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_reap_scores_and_kept_sets_equal_the_official_formula(tmp_path, ratio):
    from safetensors.torch import load_file, save_file

    model = _lm(seed=11, depth=3)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(12))
    save_file({"input_ids": ids}, str(tmp_path / "calib.safetensors"))
    batches = list(load_file(str(tmp_path / "calib.safetensors"))["input_ids"].split(4))
    want_scores, want_kept = _official_reap(model, batches, ratio)
    stats = calibrate(model, batches, statistics={"expert_output_norms": {}})
    for i in range(3):
        assert torch.allclose(reap_scores(dict(stats[f"blocks.{i}.moe"]["expert_output_norms"])), want_scores[i], rtol=1e-5)
    report: dict = {}
    merge_moekit_model(model, batches, experts=1 - ratio, method="reap", budget="uniform", form="plain",
                       protect_super_experts=False, quiet=True, report=report)  # fmt: skip
    assert [report["kept"][f"blocks.{i}.moe"] for i in range(3)] == want_kept


# ----- NAEE against brute force
def test_nae_picks_the_subset_whose_pruned_layer_best_reconstructs_the_original():
    from moekit.merging.moekit_blocks import build_merged_layer
    from moekit.merging.weights import LayerMergeResult

    model, batches = _lm(seed=3, num_experts=5, depth=1), _batches(2, seed=4)
    x = _layer_inputs(model, batches)[0]
    moe = model.blocks[0].moe
    with torch.no_grad():
        target = moe(x.unsqueeze(0)).y[0].double()
        losses = {}
        w = read_moe_layer(moe)
        for subset in itertools.combinations(range(5), 3):
            kept = torch.tensor(subset)
            pruned = LayerMergeResult(w.replace(params={k: v[kept] for k, v in w.params.items()},
                                                router_weight=w.router_weight[kept]), torch.zeros(5, dtype=torch.long), kept)  # fmt: skip
            layer = build_merged_layer(moe, pruned, "plain")
            losses[subset] = float((layer(x.unsqueeze(0)).y[0].double() - target).pow(2).sum())
    best = min(losses, key=lambda s: (losses[s], s))
    report: dict = {}
    merge_moekit_model(model, batches, experts=3, method="nae", budget="uniform", form="plain",
                       protect_super_experts=False, quiet=True, report=report)  # fmt: skip
    assert tuple(report["kept"]["blocks.0.moe"]) == best


def test_nae_refuses_blocks_with_too_many_subsets():
    with pytest.raises(ValueError, match=r"C\(64, 48\) = \d+ exceeds max_subsets=5000"):
        create_method("nae").check(64, 48)
    assert math.comb(8, 4) <= 5000
    create_method("nae").check(8, 4)


# ----- HC-SMoE
def test_agglomerate_by_hand_ties_and_singletons():
    f = torch.tensor([[0.0], [0.1], [5.0], [5.2], [10.0]])
    assert agglomerate(f, 3).tolist() == [0, 0, 1, 1, 2]
    assert agglomerate(torch.tensor([[0.0], [1.0], [2.0]]), 2).tolist() == [0, 0, 1]  # tie: the lower pair merges
    assert agglomerate(f, 3, singletons=torch.tensor([False, True, False, False, False])).tolist() == [0, 1, 2, 2, 2]  # 4.9 < 5.1
    with pytest.raises(ValueError, match="must stay singletons"):
        agglomerate(f, 2, singletons=torch.tensor([True, True, False, False, False]))


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_agglomerate_matches_scipy(linkage):
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    f = torch.randn(12, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for G in (2, 4, 7):
        ours = agglomerate(f, G, linkage=linkage)
        theirs = fcluster(scipy_linkage(f.numpy(), method=linkage, metric="euclidean"), G, criterion="maxclust")
        part = lambda labels: {frozenset(i for i, l in enumerate(labels) if l == c) for c in set(labels)}
        assert part(ours.tolist()) == part(list(theirs))


def test_hc_smoe_merges_clusters_with_frequency_weights_and_the_dominant_nearest_the_mean():
    w = _weights(E=4)
    feats = torch.tensor([[0.0, 0.0], [0.0, 1.0], [9.0, 9.0], [0.0, 0.4]])
    stats = {"all_token_output_sums": {"sums": feats * 10, "tokens": torch.tensor(10.0)},
             "counts": {"counts": torch.tensor([1.0, 3.0, 2.0, 0.0])}}  # fmt: skip
    r = create_method("hc-smoe").reduce(w, stats, 2, RoutingSpec(top_k=1))
    assert r.expert_map.tolist() == [1, 1, 0, 1] and r.dominant.tolist() == [2, 3]  # 3 (0.4) is nearest the mean
    mix = torch.tensor([1.0, 3.0, 0.0]) / 4
    want = (mix[:, None, None] * w.params["up_proj"][[0, 1, 3]]).sum(0)
    assert torch.allclose(r.weights.params["up_proj"][1], want)
    assert torch.equal(r.weights.params["up_proj"][0], w.params["up_proj"][2])


def test_uniform_control_deals_equal_groups_and_averages_them():
    w = _weights(E=7)
    r = create_method("uniform", seed=3).reduce(w, {}, 3, RoutingSpec(top_k=1))
    sizes = sorted(torch.bincount(r.expert_map, minlength=3).tolist())
    assert sizes == [2, 2, 3]
    for g in range(3):
        members = torch.nonzero(r.expert_map == g).flatten()
        assert int(r.dominant[g]) == int(members.min())
        assert torch.allclose(r.weights.params["down_proj"][g], w.params["down_proj"][members].mean(0))


def test_random_control_is_seeded():
    w = _weights(E=8)
    kept = lambda seed: [create_method("random", seed=seed).reduce(w, {}, 4, RoutingSpec()).dominant.tolist()]
    assert kept(0) == kept(0) and kept(0) != kept(1)


# ----- MoNE novices in the model
def test_mone_layer_answers_pruned_choices_with_the_mean_output_times_the_gate():
    model, batches = _lm(seed=4, depth=1), _batches(2, seed=5)
    merged = merge_moekit_model(model, batches, experts=4, method="mone", budget="uniform", form="exact",
                                protect_super_experts=False, quiet=True)  # fmt: skip
    layer, moe = merged.blocks[0].moe, model.blocks[0].moe
    assert layer.experts.real_experts == 4 and layer.experts.num_experts == 8
    x = _layer_inputs(model, batches)[0]
    with torch.no_grad():
        d = moe.router(x)
        kept = set(torch.nonzero(layer.expert_map < 4).flatten().tolist())
        want = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(2):
                e, g = int(d.ids_TK[t, slot]), d.weights_TK[t, slot]
                if e in kept:
                    want[t] += g * _glu(moe, e, x[t])
                else:
                    routed = (d.ids_TK == e).any(1)
                    want[t] += g * torch.stack([_glu(moe, e, x[s]) for s in torch.nonzero(routed).flatten()]).mean(0)
        assert torch.allclose(layer(x.unsqueeze(0)).y[0], want, atol=1e-5)


def _glu(moe, e: int, x: torch.Tensor) -> torch.Tensor:
    g, u = (x @ moe.experts.gate_up_proj[e].t()).chunk(2, -1)
    return (F.silu(g) * u) @ moe.experts.down_proj[e].t()


def test_mone_model_survives_a_checkpoint_round_trip_and_refuses_the_plain_form(tmp_path):
    from moekit import load_checkpoint, save_checkpoint

    model, batches = _lm(seed=6), _batches()
    merged = merge_moekit_model(model, batches, experts=4, method="mone", budget="uniform", quiet=True)
    back = load_checkpoint(save_checkpoint(merged, tmp_path / "m"))
    x = batches[0]
    with torch.no_grad():
        assert torch.allclose(back(x)[0], merged(x)[0])
    with pytest.raises(ValueError, match="use form='exact'"):
        merge_moekit_model(model, batches, experts=4, method="mone", budget="uniform", form="plain", quiet=True)


# ----- super experts
def _with_super_expert(layer: int, expert: int, depth: int = 4) -> MoELM:
    model = _lm(seed=8, depth=depth)
    with torch.no_grad():
        model.blocks[layer].moe.experts.down_proj[expert] *= 300.0
    return model


def test_super_expert_rule_by_hand():
    ex = {"a": {"abs_max": torch.tensor([1.0, 50.0, 2.0])}, "b": {"abs_max": torch.tensor([3.0, 1.0, 6.0])},
          "c": {"abs_max": torch.tensor([1.0, 1.0, 900.0])}, "d": {"abs_max": torch.tensor([1.0, 1.0, 1.0])}}  # fmt: skip
    # first 75% of 4 layers = a, b, c; maxima there: the 99.5th percentile is just below 900, max/10 = 90
    assert super_experts(ex, ["a", "b", "c", "d"]) == {"a": [], "b": [], "c": [2], "d": []}
    ex["a"]["abs_max"][1] = 95.0
    assert super_experts(ex, ["a", "b", "c", "d"], percentile=80)["a"] == [1]  # > 90 and > the 80th percentile
    assert super_experts(ex, ["d", "a", "b", "c"])["c"] == []  # now in the last quarter: never a super expert


@pytest.mark.parametrize("method", NEW)
def test_a_super_expert_survives_every_method(method):
    model, batches = _with_super_expert(1, 5), _batches()
    _, report = _compress(model, batches, method, 2, form="exact" if method == "mone" else "plain")
    assert report["protected"]["blocks.1.moe"] == [5]
    assert all(v == [] for k, v in report["protected"].items() if k != "blocks.1.moe")
    assert 5 in report["kept"]["blocks.1.moe"]


def test_a_super_expert_in_the_last_quarter_of_layers_is_not_protected():
    model, batches = _with_super_expert(3, 5), _batches()
    _, report = _compress(model, batches, "reap", 2)
    assert report["protected"]["blocks.3.moe"] == []


# ----- budgets and options
def test_fraction_budgets_follow_reaps_rounding():
    spec = lambda f: CompressionSpec(method="reap", experts=f)
    assert [spec(f).kept(8) for f in (0.5, 0.75, 0.3, 0.1)] == [4, 6, 3, 1]
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        CompressionSpec(experts=1.5)


def test_global_budget_with_reap_scores_spends_the_whole_budget():
    model, batches = _lm(seed=9, depth=3), _batches()
    report: dict = {}
    merge_moekit_model(model, batches, experts=4, method="reap", budget="global", form="exact",
                       protect_super_experts=False, quiet=True, report=report)  # fmt: skip
    assert sum(report["counts"].values()) == 12 and len(set(report["counts"].values())) >= 1


def test_every_method_declares_documented_options_for_moekit_compress():
    from moekit.cli._methods import declared_options
    from moekit.registry import EXPERT_METHODS

    for name in list_methods():
        for o in declared_options(name, EXPERT_METHODS.get(name)):
            assert o.help, f"{name}: option {o.name} has no option_help entry"
    reap = {o.name: o for o in declared_options("reap", EXPERT_METHODS.get("reap"))}
    assert reap["gate"].default == "renormalized" and reap["max_tokens"].parse("12") == 12


@pytest.mark.parametrize("method", NEW + ("m-smoe",))
def test_every_method_runs_streamed_on_a_moekit_lm(method):
    model, batches = _lm(seed=10), _batches()
    merged, _ = _compress(model, batches, method, 4, form="exact")
    assert [getattr(b.moe.experts, "real_experts", b.moe.experts.num_experts) for b in merged.blocks] == [4, 4]
    with torch.no_grad():
        assert torch.isfinite(merged(batches[0])[0]).all()
    assert copy.deepcopy(model).state_dict().keys() == model.state_dict().keys()  # input untouched


@pytest.mark.parametrize("method", ["mone", "hc-smoe", "nae"])
def test_moekit_compress_streams_a_moekit_checkpoint_and_it_reloads(tmp_path, method):
    import json

    from moekit import load_checkpoint, save_checkpoint
    from moekit.cli.main import main

    save_checkpoint(_lm(seed=12), tmp_path / "lm")
    (tmp_path / "calib.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    assert main(["compress", str(tmp_path / "lm"), "--method", method, "--experts", "0.5", "--form", "exact",
                 "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--seq-len", "16",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert report["verification"]["max_abs_logit_diff"] < 1e-4 and report["protected_super_experts"] is not None
    back = load_checkpoint(tmp_path / "out")
    assert [getattr(b.moe.experts, "real_experts", b.moe.experts.num_experts) for b in back.blocks] == [4, 4]
