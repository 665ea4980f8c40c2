"""Every expert method on tiny Qwen3-MoE and Mixtral models built from configs: the plain form
reloads with stock transformers and computes the same logits, the exact form reloads with
``moekit.load_hf_model``, ``moekit eval`` runs on a compressed model, and MoNE (novices) is refused
clearly on families that cannot hold novices (MoNE on the others: tests/test_hf_mone.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_model

from moekit.cli.main import main
from moekit.integrations.hf import load_hf_model, merge_hf_model
from moekit.integrations.hf.checks import quiet_transformers
from moekit.merging.pipeline import CompressionSpec, run_pipeline

METHODS = ("reap", "ean", "frequency", "hc-smoe", "nae", "random", "uniform")


def _compress(model, method: str, form: str):
    from moekit.integrations.hf.stack import hf_stack

    out = copy.deepcopy(model)
    batches = [torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    spec = CompressionSpec(method=method, experts=4, budget="uniform", form=form, propagate="original")
    report = run_pipeline(hf_stack(out.eval()), batches, spec)
    return out, report


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("method", METHODS)
def test_plain_form_reloads_with_stock_transformers(tmp_path, family, method):
    model = tiny_model(family)
    out, report = _compress(model, method, "plain")
    assert set(report["counts"].values()) == {4} and report["protected"] is not None
    with quiet_transformers():
        out.save_pretrained(tmp_path / "m")
        back = type(model).from_pretrained(tmp_path / "m").eval()
    assert back.config.num_experts_per_tok == 2
    n = back.config.num_local_experts if family == "mixtral" else back.config.num_experts
    assert n == 4
    x = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, out(x).logits, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_exact_form_reloads_with_moekit(tmp_path, method):
    model = tiny_model("qwen3_moe")
    out, _ = _compress(model, method, "exact")
    with quiet_transformers():
        out.save_pretrained(tmp_path / "m")
    back = load_hf_model(tmp_path / "m").eval()
    x = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, out(x).logits, atol=1e-5)


def test_mone_is_refused_clearly_on_families_that_cannot_hold_novices():
    with pytest.raises(ValueError, match="novices, which the switch_transformers family cannot hold"):
        merge_hf_model(tiny_model("switch_transformers"), [torch.randint(3, 256, (2, 8))], experts=4, method="mone",
                       form="exact", quiet=True)  # fmt: skip


def test_cli_compress_with_reap_then_moekit_eval(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "mixtral"
    with quiet_transformers():
        tiny_model("mixtral").save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 40)
    out = tmp_path / "pruned"
    assert main(["compress", str(src), "--method", "reap", "--experts", "0.5", "--gate", "softmax", "--form", "plain",
                 "--calib", str(calib), "--calib-samples", "4", "--seq-len", "16", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads((out / "compress_report.json").read_text())
    assert report["method"] == "reap" and report["method_options"] == {"gate": "softmax"}
    assert report["protect_super_experts"] is True
    assert set(report["protected_super_experts"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert list(report["experts_per_block"].values()) == [3, 3]
    ids = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    assert main(["eval", str(out), "--data", str(tmp_path / "ids.safetensors"), "--reference", str(src),
                 "--tasks", "perplexity,generate", "--prompts", "3", "--prompt-length", "12", "--new-tokens", "4",
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["runs"][0]["tasks"]["generate"]["metrics"]["continuation_agreement"]["n"] == 3


@pytest.mark.parametrize("method", ["reap", "hc-smoe", "nae"])
def test_streamed_from_disk_equals_in_memory(tmp_path, method):
    from moekit.merging.observer import mix_calibration
    from moekit.merging.streaming import compress_checkpoint

    model = tiny_model("qwen3_moe")
    with quiet_transformers():
        model.save_pretrained(tmp_path / "in")
    gen = torch.Generator().manual_seed(3)
    batches = mix_calibration([([torch.randint(3, 256, (2, 16), generator=gen)], 2.0),
                               ([torch.randint(3, 256, (2, 16), generator=gen) for _ in range(2)], 1.0)])  # fmt: skip
    spec = CompressionSpec(method=method, experts=4, budget="uniform", form="plain", propagate="original")
    report = compress_checkpoint(tmp_path / "in", tmp_path / "out", batches, spec, quiet=True)
    from moekit.integrations.hf.stack import hf_stack

    memory = copy.deepcopy(model)
    expected = run_pipeline(hf_stack(memory.eval()), batches, spec)
    assert report["kept"] == expected["kept"] and report["protected_super_experts"] == expected["protected"]
    with quiet_transformers():
        back = type(model).from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, memory(x).logits, atol=1e-5)


def test_cli_calib_weights_mix_two_sources(tmp_path):
    src = tmp_path / "qwen"
    with quiet_transformers():
        tiny_model("qwen3_moe").save_pretrained(src)
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "b.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--method", "frequency", "--experts", "4", "--form", "plain", "--calib-samples", "3", "--seq-len", "16",
              "--quiet", "--no-protect-super-experts"]  # fmt: skip
    assert main(["compress", str(src), "--calib", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--calib-weights",
                 "0.999,0.001", *common, "--out", str(tmp_path / "ab")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "ab" / "compress_report.json").read_text())
    assert report["calibration_sources"]["weights"] == [0.999, 0.001] and report["calibration_sources"]["rows"] == 6
    assert report["protected_super_experts"] is None  # --no-protect-super-experts
    assert main(["compress", str(src), "--calib", str(tmp_path / "a.txt"), "--calib-weights", "1,2", *common,
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
