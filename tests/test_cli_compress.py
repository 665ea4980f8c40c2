"""``moekit compress``: streamed merge / prune / low-rank from the command line, method options from the
registry, token-id calibration files, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import VOCAB, generate, logits, model_class, tiny_model, token_batches  # noqa: E402

from moekit.cli.main import main  # noqa: E402
from moekit.integrations.hf import load_hf_model  # noqa: E402
from moekit.merging.shards import tensor_sizes  # noqa: E402


@pytest.fixture
def src(tmp_path) -> Path:
    directory = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(directory)
    return directory


def _compress(*args: object) -> int:
    return main(["compress", *map(str, args), "--calib-samples", "8", "--seq-len", "16", "--quiet"])


def _shards(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_plain_form_reloads_with_stock_transformers_and_generates(src, tmp_path):
    out = tmp_path / "out"
    assert _compress(src, "--experts", 3, "--form", "plain", "--out", out) == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert report["form"] == "plain" and report["budget"] == "uniform"
    assert set(report["experts_per_block"].values()) == {3}
    assert report["weights_bytes_after"] < report["weights_bytes_before"]
    model = model_class("mixtral").from_pretrained(out)
    assert model.config.num_local_experts == 3
    ids = token_batches(1)[0]
    assert generate(model, ids[:1, :6]).shape == (1, 10)


def test_rank_makes_a_smaller_moekit_only_checkpoint(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compress(src, "--experts", 4, "--rank", 4, "--keep-residual", 0.1, "--out", out) == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert report["lowrank"]["rank"] == 4
    sizes = tensor_sizes(next(out.glob("model-00001-*.safetensors")))
    assert any(k.endswith("experts.lowrank.gate_up_proj_u") for k in sizes)
    assert not any(k.endswith(".w1.weight") for k in sizes)  # no dense expert left in a compressed layer
    assert report["weights_bytes_after"] < 0.6 * report["weights_bytes_before"]
    with pytest.raises(ValueError, match="moekit.load_hf_model"):
        model_class("mixtral").from_pretrained(out)
    model = load_hf_model(out)
    with torch.no_grad():
        assert torch.isfinite(logits(model, token_batches(1)[0])).all()


def test_experts_equal_to_the_model_says_nothing_would_be_merged(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(src), "--experts", "6", "--out", str(out)]) == 0
    assert "nothing would be merged" in capsys.readouterr().out
    assert not out.exists()


def test_token_id_files_reproduce_the_batch(src, tmp_path):
    """The same ids as .safetensors (with a mask) and as .jsonl give the same tensors, bit for bit."""
    from safetensors.torch import save_file

    ids = torch.randint(3, VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "calib.safetensors"))
    lines = [json.dumps({"input_ids": i.tolist(), "attention_mask": m.tolist()}) for i, m in zip(ids, mask)]
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n")
    outs = []
    for name in ("calib.safetensors", "calib.jsonl"):
        out = tmp_path / f"out_{name}"
        assert main(["compress", str(src), "--experts", "3", "--calib", str(tmp_path / name), "--batch-size", "4",
                     "--out", str(out), "--quiet"]) == 0  # fmt: skip
        outs.append(_shards(out))
        report = json.loads((out / "compress_report.json").read_text())
        assert report["calibration_sources"]["rows"] == 6
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_method_options_come_from_the_registry(src, tmp_path, capsys):
    """A method registered by anyone gets its keyword options as flags; others' flags are refused."""
    from moekit.merging.methods.frequency import FrequencyPruning
    from moekit.registry import EXPERT_METHODS

    @EXPERT_METHODS.register("test-skip-first", summary="frequency pruning that never keeps the first experts")
    class SkipFirst(FrequencyPruning):
        option_help = {"skip": "experts (lowest ids) never kept"}

        def __init__(self, *, skip: int = 0, max_tokens: int = 8192) -> None:
            super().__init__(max_tokens=max_tokens)
            self.skip = skip

        def budget_score(self, stats):
            scores = super().budget_score(stats).clone()
            scores[: self.skip] = 0.0
            return scores

    try:
        assert main(["compress", "--help"]) == 0
        help_text = capsys.readouterr().out
        assert "--skip" in help_text and "never kept" in help_text
        assert main(["compress", str(src), "--experts", "3", "--method", "frequency", "--skip", "1",
                     "--out", str(tmp_path / "x")]) == 2  # fmt: skip
        assert "--skip is not an option of --method frequency" in capsys.readouterr().err
        assert _compress(src, "--experts", 3, "--method", "test-skip-first", "--skip", 2, "--out", tmp_path / "y") == 0
    finally:
        EXPERT_METHODS._entries.pop("test-skip-first", None)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--experts", "9"], "--experts must be between 1 and 6"),
        (["--experts", "3", "--anchor", "0", "--method", "frequency"], "--anchor is not an option of --method frequency"),
        (["--experts", "3", "--recover-steps", "5"], "give --rank too"),
        (["--experts", "3", "--max-memory", "1MB"], "--max-memory 1.00 MB is too small"),
        (["--experts", "3", "--max-memory", "lots"], "size must look like"),
        (["--experts", "3", "--exclude", "nope"], "--exclude names ['nope']"),
        (["--experts", "3", "--form", "plain", "--budget", "global"], "--pad"),
        (["--rank", "2", "--keep-residual", "1.5"], "must be in [0, 1]"),
        ([], "give --experts N"),
    ],
)
def test_bad_requests_are_one_line_errors_and_leave_nothing(src, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["compress", str(src), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_bad_token_files_are_refused(src, tmp_path, capsys):
    bad = tmp_path / "ragged.jsonl"
    bad.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [5, 6]}\n')
    assert main(["compress", str(src), "--experts", "3", "--calib", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "same non-zero length" in capsys.readouterr().err
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"input_ids": [5, VOCAB]}) + "\n")
    assert main(["compress", str(src), "--experts", "3", "--calib", str(big), "--out", str(tmp_path / "o")]) == 2
    assert f"must be in [0, {VOCAB})" in capsys.readouterr().err


def test_pad_writes_a_stock_loadable_plain_form_and_says_what_it_costs(tmp_path, capsys):
    src = tmp_path / "gpt_oss"
    tiny_model("gpt_oss", seed=0, num_hidden_layers=3,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"]).save_pretrained(src)  # fmt: skip
    from safetensors.torch import save_file

    save_file({"input_ids": torch.cat(token_batches())}, str(tmp_path / "ids.safetensors"))  # counts differ here
    out = tmp_path / "out"
    assert main(["compress", str(src), "--experts", "3", "--form", "plain", "--budget", "global", "--pad",
                 "--calib", str(tmp_path / "ids.safetensors"), "--batch-size", "4", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((out / "compress_report.json").read_text())
    assert report["padding_bytes"] > 0 and "of never-routed experts (--pad)" in printed
    model = model_class("gpt_oss").from_pretrained(out)
    assert model.config.num_local_experts == max(report["experts_per_block"].values())
