"""``moekit merge``: Hugging Face and moekit inputs, atomic output, input untouched, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import logits, model_class, tiny_model, token_batches  # noqa: E402

from moekit import MoELM, load_checkpoint, save_checkpoint  # noqa: E402
from moekit.cli.main import main  # noqa: E402
from moekit.integrations.hf import load_hf_model  # noqa: E402


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_bytes(Path(__file__).read_bytes())
    return path


def _hf_dir(tmp_path: Path, family: str = "mixtral") -> Path:
    directory = tmp_path / f"hf_{family}"
    tiny_model(family).save_pretrained(directory)
    return directory


def _lm_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = MoELM(dim=32, depth=2, heads=2, num_experts=6, k=2, hidden=48, max_seq_len=64)
    return save_checkpoint(model, tmp_path / "lm")


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _merge(*args: object) -> int:
    return main(["merge", *map(str, args), "--calib-samples", "8", "--seq-len", "32", "--quiet"])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_merge_hf_plain_reloads_with_stock_transformers(family, tmp_path, calib):
    src = _hf_dir(tmp_path, family)
    before = _digest(src)
    out = tmp_path / "out"
    assert _merge(src, "--experts", 2, "--calib", calib, "--out", out) == 0
    assert _digest(src) == before  # the input is only read
    assert _leftovers(tmp_path) == []
    report = json.loads((out / "merge_report.json").read_text())
    assert report["form"] == "plain" and report["budget"] == "uniform"
    assert all(layer["experts"] == 2 == layer["router_outputs"] for layer in report["layers"].values())
    assert report["params_after"] < 0.75 * report["params_before"]
    assert report["weights_bytes_after"] < 0.75 * report["weights_bytes_before"]
    assert report["calibration"]["tokenizer"] == "bytes % vocab_size" and report["calibration"]["tokens"] == 8 * 32
    model = model_class(family).from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    with torch.no_grad():
        assert torch.isfinite(logits(model, token_batches(1)[0])).all()


def test_merge_hf_exact_loads_with_moekit(tmp_path, calib):
    src = _hf_dir(tmp_path)
    out = tmp_path / "out"
    assert _merge(src, "--experts", 3, "--form", "exact", "--calib", calib, "--out", out) == 0
    report = json.loads((out / "merge_report.json").read_text())
    counts = [layer["experts"] for layer in report["layers"].values()]
    assert report["budget"] == "global" and sum(counts) == 6
    assert all(layer["router_outputs"] == 6 for layer in report["layers"].values())
    model = load_hf_model(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_merge_hf_uses_the_saved_tokenizer(tmp_path, calib):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    src = _hf_dir(tmp_path)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([calib.read_text()], trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    out = tmp_path / "out"
    assert _merge(src, "--experts", 2, "--calib", calib, "--out", out) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["calibration"]["tokenizer"] == "model"
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("form", ["plain", "exact"])
def test_merge_moekit_checkpoint(form, tmp_path, calib):
    src = _lm_dir(tmp_path)
    before = _digest(src)
    out = tmp_path / "out"
    assert _merge(src, "--experts", 2, "--form", form, "--calib", calib, "--out", out) == 0
    assert _digest(src) == before
    merged = load_checkpoint(out)
    report = json.loads((out / "merge_report.json").read_text())
    assert sum(p.numel() for p in merged.parameters()) == report["params_after"] < report["params_before"]
    assert report["weights_bytes_after"] < report["weights_bytes_before"]
    with torch.no_grad():
        assert torch.isfinite(merged(torch.randint(0, 256, (2, 16)))[0]).all()


def test_overwrite_replaces_only_an_earlier_output_of_moekit(tmp_path, calib, capsys):
    src = _hf_dir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert _merge(src, "--experts", 2, "--calib", calib, "--out", mine) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert _merge(src, "--experts", 2, "--calib", calib, "--out", mine, "--overwrite") == 2
    assert "was not written by moekit" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"] and (mine / "keep.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert _merge(src, "--experts", 3, "--calib", calib, "--out", out) == 0
    assert _merge(src, "--experts", 2, "--calib", calib, "--out", out, "--overwrite") == 0
    assert json.loads((out / "merge_report.json").read_text())["experts"] == 2
    assert _leftovers(tmp_path) == []


def _break(kind: str, tmp_path: Path, calib: Path) -> tuple[list[object], str]:
    """Arguments for one bad invocation and the message it must give."""
    if kind == "too_many_experts":
        return [_hf_dir(tmp_path), "--experts", 7, "--calib", calib], "between 1 and 6"
    if kind == "zero_experts":
        return [_lm_dir(tmp_path), "--experts", 0, "--calib", calib], "argument --experts: must be >= 1, got 0"
    if kind == "missing_input":
        return [tmp_path / "nope", "--experts", 2, "--calib", calib], "does not exist"
    if kind == "no_config":
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty", "--experts", 2, "--calib", calib], "has no config.json"
    if kind == "corrupt_config":
        src = _hf_dir(tmp_path)
        (src / "config.json").write_text("{not json")
        return [src, "--experts", 2, "--calib", calib], "corrupt input config"
    if kind == "corrupt_weights":
        src = _hf_dir(tmp_path)
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
        return [src, "--experts", 2, "--calib", calib], "cannot read the safetensors files of"
    if kind == "missing_weights":
        src = _hf_dir(tmp_path)
        (src / "model.safetensors").unlink()
        return [src, "--experts", 2, "--calib", calib], "has no model.safetensors (nor a sharded model.safetensors.index.json)"
    if kind == "corrupt_moekit_weights":
        src = _lm_dir(tmp_path)
        (src / "model.safetensors").write_bytes(b"garbage")
        return [src, "--experts", 2, "--calib", calib], "corrupt checkpoint weights"
    if kind == "unknown_family":
        import transformers as tf

        config = tf.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)  # fmt: skip
        tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
        return [tmp_path / "llama", "--experts", 2, "--calib", calib], "unknown MoE model family model_type='llama'"
    if kind == "empty_calibration":
        (tmp_path / "empty.txt").write_text("")
        return [_hf_dir(tmp_path), "--experts", 2, "--calib", tmp_path / "empty.txt"], "is empty"
    if kind == "missing_calibration":
        return [_lm_dir(tmp_path), "--experts", 2, "--calib", tmp_path / "none.txt"], "calibration file"
    if kind == "calibration_never_reaches":  # expert capacity 0: the routers drop every token
        src = tmp_path / "switch"
        tiny_model("switch_transformers", expert_capacity=0).save_pretrained(src)
        return [src, "--experts", 2, "--calib", calib], "never reached MoE blocks"
    if kind == "already_merged":
        from moekit.integrations.hf import merge_hf_model

        merged = merge_hf_model(tiny_model("olmoe"), token_batches(1), experts=2, form="exact", quiet=True)
        merged.save_pretrained(tmp_path / "exact")
        return [tmp_path / "exact", "--experts", 2, "--calib", calib], "already merged (exact form)"
    if kind == "out_is_input":
        src = _lm_dir(tmp_path)
        return [src, "--experts", 2, "--calib", calib, "--overwrite", "--out", src], "is the input"
    if kind == "unknown_method":
        args = [_lm_dir(tmp_path), "--experts", 2, "--method", "magic", "--calib", calib]
        return args, "unknown merge method 'magic'"
    if kind == "plain_global":
        return [_hf_dir(tmp_path), "--experts", 2, "--budget", "global", "--calib", calib], "needs budget='uniform'"
    raise ValueError(kind)


BAD = ["too_many_experts", "zero_experts", "missing_input", "no_config", "corrupt_config", "corrupt_weights",
       "missing_weights", "corrupt_moekit_weights", "unknown_family", "empty_calibration", "missing_calibration",
       "calibration_never_reaches", "already_merged", "out_is_input", "unknown_method", "plain_global"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_a_one_line_error_and_leaves_nothing(kind, tmp_path, calib, capsys):
    args, message = _break(kind, tmp_path, calib)
    if "--out" not in args:
        args += ["--out", tmp_path / "out"]
    capsys.readouterr()
    assert _merge(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moekit merge: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []
