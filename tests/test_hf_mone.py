"""MoNE (novices, https://arxiv.org/abs/2507.00390) on Hugging Face models: the exact form with
novices against a hand-written reference, streamed == in memory, reload with ``moekit.load_hf_model``
(stock transformers refused, naming it), ``moekit compress --method mone`` then ``moekit eval``,
resume after an interruption, and the refusals (plain form, ``--rank``, Switch)."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from hf_tiny import DECODER_FAMILIES, generate, model_class, tiny_model, token_batches

from moekit.cli.main import main
from moekit.integrations.hf import family_for, hf_stack, load_hf_model, save_hf_model
from moekit.integrations.hf.checks import quiet_transformers
from moekit.merging.lowrank import LowRankOptions
from moekit.merging.pipeline import CompressionSpec, run_pipeline
from moekit.merging.streaming import compress_checkpoint

SPEC = CompressionSpec(method="mone", experts=4, budget="uniform", form="exact", propagate="original")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not different, different


# ----- the hand-written reference: the original model, pruned experts answered by mean outputs
def _expert(experts: nn.Module, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a fused SwiGLU bank (``gate_up_proj [E, 2F, D]`` gate rows first, ``down_proj [E, D, F]``)."""
    gate, up = (x_ND @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T


def _experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    family = family_for(model)
    return {name: block.experts for name, block in family.blocks(model).items()}


def _mean_outputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per block ``[E, D]``: mean of ``f_e(x)`` over the calibration tokens routed to e (0 if none)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(module, args, kwargs):
            x, ids = [*args, *kwargs.values()][:2]
            E = module.num_experts
            s = sums.setdefault(name, torch.zeros(E, x.shape[-1], dtype=torch.float64))
            c = counts.setdefault(name, torch.zeros(E, dtype=torch.float64))
            for e in range(E):
                rows = (ids == e).any(-1)
                s[e] += _expert(module, e, x[rows]).double().sum(0)
                c[e] += rows.sum()

        return pre

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in _experts_modules(model).items()]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in handles:
        h.remove()
    return {
        n: torch.where(counts[n][:, None] > 0, sums[n] / counts[n].clamp_min(1)[:, None], 0.0).float() for n in sums
    }


def _reference(model: nn.Module, novices: dict[str, list[int]], mu: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` whose experts answer router choice e of a pruned expert with ``gate * mu[e]``."""

    def naive(pruned: set[int], mu_ED: torch.Tensor):
        def forward(self, x_TD, ids_TK, gates_TK):
            out = torch.zeros_like(x_TD)
            for t in range(x_TD.shape[0]):
                for k in range(ids_TK.shape[1]):
                    e = int(ids_TK[t, k])
                    y = mu_ED[e] if e in pruned else _expert(self, e, x_TD[t : t + 1])[0]
                    out[t] += gates_TK[t, k] * y
            return out

        return forward

    ref = copy.deepcopy(model)
    for name, experts in _experts_modules(ref).items():
        experts.forward = types.MethodType(naive(set(novices[name]), mu[name]), experts)
    return ref


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_reloaded_mone_model_equals_the_hand_written_reference(tmp_path, family):
    model = tiny_model(family)
    batches = token_batches()
    out = copy.deepcopy(model)
    report = run_pipeline(hf_stack(out), batches, SPEC)
    layers = report["layers"]
    novices = {n: layers[n]["novices"] for n in layers}
    assert all(len(v) == 2 and set(v).isdisjoint(report["kept"][n]) for n, v in novices.items())
    save_hf_model(out, tmp_path / "m")
    back = load_hf_model(tmp_path / "m").eval()
    ref = _reference(model, novices, _mean_outputs(model, batches))
    ids = token_batches(1, batch=2, seq=10, seed=7)[0]
    with torch.no_grad():
        got, want, original = back(ids).logits, ref(input_ids=ids).logits, model(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, original, atol=1e-3)  # the novices changed something
    if family == "qwen2_moe":  # the shared expert and its gate are the original's
        shared = {k: v for k, v in _state(model).items() if "shared_expert" in k}
        _assert_same(shared, {k: v for k, v in _state(back).items() if "shared_expert" in k})
    with pytest.raises(ValueError, match="moekit.load_hf_model"):
        model_class(family).from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_streamed_mone_equals_in_memory_and_reloads(tmp_path, family):
    with quiet_transformers():
        tiny_model(family).save_pretrained(tmp_path / "in")
    spec = CompressionSpec(method="mone", experts=4, budget="uniform", form="exact", propagate="compressed")
    report = compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True)
    in_memory = tiny_model(family)
    run_pipeline(hf_stack(in_memory), token_batches(), spec)
    back = load_hf_model(tmp_path / "out")
    _assert_same(_state(back), _state(in_memory))
    assert report["verification"]["max_abs_logit_diff"] <= 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(len(layer["novices"]) == 2 for layer in config["moekit_merge"]["layers"].values())
    novice_keys = [k for k in _state(back) if k.endswith("experts.novices")]
    assert len(novice_keys) == 2 and all(back.state_dict()[k].shape == (2, 32) for k in novice_keys)
    with pytest.raises(ValueError, match="moekit.load_hf_model"):
        model_class(family).from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert generate(back.eval(), token_batches(1, batch=2, seq=6, seed=4)[0]).shape[0] == 2


def test_interrupted_mone_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    import safetensors.torch as st
    from safetensors.torch import load_file

    def disk(directory):
        return {k: v for p in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(p)).items()}

    with quiet_transformers():
        tiny_model("qwen3_moe").save_pretrained(tmp_path / "in")
    spec = CompressionSpec(method="mone", experts=4, budget="uniform", form="exact", propagate="compressed")
    compress_checkpoint(tmp_path / "in", tmp_path / "whole", token_batches(), spec, quiet=True)
    save, calls = st.save_file, [0]

    def failing(tensors, path, metadata=None):  # the 9th file: a unit's output shard
        calls[0] += 1
        if calls[0] == 9:
            raise KeyboardInterrupt
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True)
    monkeypatch.setattr(st, "save_file", save)
    compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True, resume=True)
    _assert_same(disk(tmp_path / "out"), disk(tmp_path / "whole"))
    assert (json.loads((tmp_path / "out" / "config.json").read_text())["moekit_merge"]
            == json.loads((tmp_path / "whole" / "config.json").read_text())["moekit_merge"])  # fmt: skip


def test_cli_compress_with_mone_then_moekit_eval(tmp_path, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "mixtral"
    with quiet_transformers():
        tiny_model("mixtral").save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 40)
    common = ["--calib", str(calib), "--calib-samples", "4", "--seq-len", "16", "--quiet"]
    assert main(["compress", str(src), "--method", "mone", "--experts", "0.5", "--form", "plain", *common,
                 "--out", str(tmp_path / "plain")]) == 2  # fmt: skip
    message = capsys.readouterr().err.strip()
    assert "form='exact'" in message and "mone" in message and "Traceback" not in message
    assert not (tmp_path / "plain").exists()
    out = tmp_path / "mone"
    assert main(["compress", str(src), "--method", "mone", "--experts", "0.5", "--form", "exact", *common,
                 "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "compress_report.json").read_text())
    assert report["method"] == "mone" and list(report["experts_per_block"].values()) == [3, 3]
    ids = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    assert main(["eval", str(out), "--data", str(tmp_path / "ids.safetensors"), "--reference", str(src),
                 "--tasks", "perplexity,generate", "--prompts", "3", "--prompt-length", "12", "--new-tokens", "4",
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["runs"][0]["tasks"]["generate"]["metrics"]["continuation_agreement"]["n"] == 3


@pytest.mark.parametrize(
    ("family", "changes", "match"),
    [
        ("qwen3_moe", {"form": "plain"}, r"method 'mone' keeps the router .* use form='exact' \(--form exact\), got form='plain'"),
        ("qwen3_moe", {"lowrank": LowRankOptions(rank=2)}, r"method 'mone' keeps novices .* \(--rank\) is not offered"),
        ("switch_transformers", {}, "novices, which the switch_transformers family cannot hold"),
    ],
)  # fmt: skip
def test_mone_requests_that_cannot_be_met_are_refused_before_any_work(family, changes, match):
    from dataclasses import replace

    model = tiny_model(family)
    with pytest.raises(ValueError, match=match):
        run_pipeline(hf_stack(model), [], replace(SPEC, **changes))  # refused before the (missing) batches matter


def test_a_mone_block_is_not_compressed_again():
    out = tiny_model("qwen3_moe")
    run_pipeline(hf_stack(out), token_batches(), SPEC)
    with pytest.raises(ValueError, match="already merged"):
        run_pipeline(hf_stack(out), token_batches(), SPEC)
    block = next(iter(family_for(out).blocks(out).values()))
    with pytest.raises(ValueError, match="MoNE novices beside its experts"):
        family_for(out).read_bank(block, out.config)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm", "moekit"])
def test_novices_give_the_same_logits_under_every_experts_implementation(tmp_path, implementation):
    import moekit.integrations.hf  # noqa: F401  (registers the moekit implementations)

    out = tiny_model("qwen3_moe")
    run_pipeline(hf_stack(out), token_batches(), SPEC)
    ids = token_batches(1, batch=2, seq=10, seed=7)[0]
    with torch.no_grad():
        out.set_experts_implementation("eager")
        eager = out(ids).logits
        out.set_experts_implementation(implementation)
        other = out(ids).logits
    assert torch.allclose(other, eager, atol=1e-5), (other - eager).abs().max()


def test_a_mone_model_pickles_and_deep_copies():
    import io

    out = tiny_model("qwen3_moe")
    run_pipeline(hf_stack(out), token_batches(), SPEC)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    ids = token_batches(1, batch=2, seq=10, seed=7)[0]
    with torch.no_grad():
        want = out(ids).logits
        for back in (torch.load(buffer, weights_only=False), copy.deepcopy(out)):
            assert type(back.model.layers[0].mlp.experts) is type(out.model.layers[0].mlp.experts)
            assert torch.equal(back(ids).logits, want)


def test_with_novices_refuses_bad_novices_and_a_second_call():
    from moekit.integrations.hf.novice import with_novices

    experts = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"novices must be \[N >= 1, D\], got \(0, 32\)"):
        with_novices(experts, torch.zeros(0, 32))
    with_novices(experts, torch.zeros(2, 32))
    with pytest.raises(ValueError, match="already holds novices"):
        with_novices(experts, torch.zeros(2, 32))
