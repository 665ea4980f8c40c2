"""``moekit eval`` on a tiny moekit LM checkpoint and on tiny Hugging Face Qwen3-MoE / Mixtral models
built from configs (stock and exact merged form); bad inputs are one-line errors (exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from eval_tiny import byte_tokenizer, text_files, tiny_lm  # noqa: E402
from hf_tiny import tiny_model  # noqa: E402

from moekit import save_checkpoint  # noqa: E402
from moekit.cli.main import main  # noqa: E402
from moekit.evaluation import lm_eval_bridge  # noqa: E402

SMALL = ["--items", "12", "--prompts", "4", "--prompt-length", "24", "--new-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    return text_files(tmp_path_factory.mktemp("data"), count=3, size=1500)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_lm(), tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE with a byte-level tokenizer saved beside it."""
    directory = tmp_path_factory.mktemp("hf") / "qwen3"
    tiny_model("qwen3_moe").save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path_factory, monkeypatch):
    """Runs without --out write under ./moekit-runs: keep them in a directory of their own."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def _eval(*args: object) -> int:
    return main(["eval", *map(str, args)])


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_eval_moekit_checkpoint_with_reference_writes_a_comparable_report(lm_dir, files, tmp_path, capsys):
    out = tmp_path / "report"
    assert _eval(lm_dir, "--data", *files, "--reference", lm_dir, "--out", out, "--threads", "1", *SMALL) == 0
    assert capsys.readouterr().out == ""  # --quiet
    r = _results(out)
    assert r["format"] == "moekit-eval" and r["tasks"] == ["perplexity", "choice", "cloze", "generate"]
    assert [run["role"] for run in r["runs"]] == ["model", "reference"]
    assert r["data"]["files"] == [str(f) for f in files] and len(r["data"]["documents"]) == 3
    assert r["environment"]["torch_threads"] == 1 and r["arguments"]["seed"] == 0
    model = r["runs"][0]["tasks"]
    assert model["perplexity"]["metrics"]["bits_per_byte"]["n"] == 3
    assert model["choice"]["metrics"]["acc"]["n"] == 12 and model["generate"]["metrics"]["kl"]["estimate"] == 0.0
    assert r["comparisons"] and all(c["difference"]["high"] == 0.0 for c in r["comparisons"])
    report = (out / "report.md").read_text()
    assert "| perplexity bits/byte" in report and "## Generation" in report and "## Paired differences" in report
    earlier = tmp_path / "earlier"
    assert _eval(lm_dir, "--data", *files, "--out", earlier, *SMALL) == 0
    assert _eval(lm_dir, "--data", *files, "--compare", earlier, *SMALL[:-1]) == 0  # printed, paired with it
    printed = capsys.readouterr().out
    assert "## Paired differences" in printed and "(earlier run)" in printed and "within noise" in printed
    paired = tmp_path / "paired"  # generation had a reference in `out`, none here: left out, said why
    assert _eval(lm_dir, "--data", *files, "--compare", out, "--out", paired, *SMALL) == 0
    r = _results(paired)
    assert [s["task"] for s in r["not_compared"]] == ["generate"] and "reference differ" in r["not_compared"][0]["reason"]
    assert {c["task"] for c in r["comparisons"]} == {"perplexity", "choice", "cloze"}
    assert "Not compared: generate" in (paired / "report.md").read_text()
    again = ("--out", tmp_path / "again")
    assert _eval(lm_dir, "--data", *files, "--compare", out, "--seed", "1", *again, *SMALL) == 2  # before any work
    assert "used other settings (seed=0 there, 1 here)" in capsys.readouterr().err
    assert _eval(lm_dir, "--data", *files[:2], "--compare", out, *again, *SMALL) == 2
    assert "evaluated other data" in capsys.readouterr().err


def test_eval_hf_qwen3_moe_with_tokenizer_scores_text_like_a_direct_forward(qwen_dir, files, tmp_path):
    out = tmp_path / "qwen"
    assert _eval(qwen_dir, "--data", *files, "--max-doc-bytes", "50", "--out", out, *SMALL) == 0
    r = _results(out)
    run = r["runs"][0]
    assert run["model"]["kind"] == "huggingface" and run["model"]["model_type"] == "qwen3_moe"
    assert r["environment"]["transformers"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_dir).eval()
    prefix = model.config.bos_token_id
    for unit, path in zip(run["tasks"]["perplexity"]["per_unit"], files):
        ids = [prefix] + list(path.read_bytes()[:50])  # the tokenizer's ids are the bytes
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nats = -float(logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        assert unit["tokens"] == unit["bytes"] == 50 and unit["nats"] == pytest.approx(nats, rel=1e-4)
    assert run["tasks"]["cloze"]["metrics"]["acc"]["n"] == 12


def test_eval_hf_mixtral_on_token_id_files(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(directory)  # no tokenizer
    ids = torch.randint(3, 256, (3, 60), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "out"
    assert _eval(directory, "--data", tmp_path / "ids.safetensors", "--tasks", "perplexity,generate",
                 "--reference", directory, "--out", out, *SMALL) == 0  # fmt: skip
    run = _results(out)["runs"][0]["tasks"]
    ppl = run["perplexity"]
    assert "bits_per_byte" not in ppl["metrics"] and ppl["metrics"]["nll_per_token"]["n"] == 3
    assert all(u["tokens"] == 59 for u in ppl["per_unit"])  # token-id documents get no BOS
    assert run["generate"]["metrics"]["continuation_agreement"]["estimate"] == 1.0


def test_eval_exact_form_merged_hf_model_against_its_original(qwen_dir, files, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", str(qwen_dir), "--experts", "3", "--form", "exact", "--calib", str(files[0]),
                 "--calib-samples", "4", "--seq-len", "32", "--out", str(merged), "--quiet"]) == 0  # fmt: skip
    out = tmp_path / "out"
    assert _eval(merged, "--data", *files, "--reference", qwen_dir, "--tasks", "perplexity,generate",
                 "--max-doc-bytes", "200", "--out", out, *SMALL) == 0  # fmt: skip
    r = _results(out)
    gen = r["runs"][0]["tasks"]["generate"]["metrics"]
    assert gen["kl"]["estimate"] > 0 and math.isfinite(gen["kl"]["estimate"])
    rows = {(c["task"], c["metric"]) for c in r["comparisons"]}
    assert ("perplexity", "bits_per_byte") in rows


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moekit eval: error: "), err
    return err


def test_bad_inputs_are_one_line_errors(lm_dir, qwen_dir, files, tmp_path, capsys):
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "config.json").write_text(
        json.dumps({"format": "moekit", "version": 1, "model": "moe_classifier", "config": {"dim": 4}})
    )
    switch = tmp_path / "switch"
    tiny_model("switch_transformers").save_pretrained(switch)
    mixtral = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(mixtral)
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a directory")
    experiment = tmp_path / "experiment.json"
    experiment.write_text(json.dumps({"experiment": "smear", "runs": [{}]}))
    cases = [
        ([tmp_path / "missing"], "does not exist"),
        ([tmp_path / "missing", "--tasks", "perplexity,mmlu"],  # before loading anything
         "--tasks entry 'mmlu' is not a task; allowed: perplexity, choice, cloze, generate, or 'none' alone"),
        ([lm_dir, "--tasks", "none"], "nothing to do"),
        ([lm_dir, "--items", "0"], "items must be >= 1"),
        ([lm_dir, "--data", tmp_path / "nope.txt"], f"--data: data file '{tmp_path / 'nope.txt'}' does not exist"),
        ([lm_dir, "--data", files[0], "--tasks", "choice"], "at least 2 documents"),
        ([lm_dir, "--out", a_file], "is not a directory"),
        ([tmp_path / "classifier"], "'moe_classifier' model; moekit eval needs a language model"),
        ([switch], "encoder-decoder"),
        ([mixtral, "--data", *files], "has no tokenizer"),
        ([lm_dir, "--reference", qwen_dir, "--data", *files, "--tasks", "generate"], "do not share a vocabulary"),
        ([lm_dir, "--compare", tmp_path / "missing"], "--compare: evaluation results"),
        ([lm_dir, "--compare", lm_dir / "config.json"], f"--compare: '{lm_dir / 'config.json'}' is not a results.json of "
                                                         "moekit eval (no format 'moekit-eval' with runs)"),
        ([lm_dir, "--compare", experiment], "is not a results.json of moekit eval (the results of moekit reproduce smear)"),
    ]
    capsys.readouterr()  # transformers' save bars
    for argv, message in cases:
        assert _eval(*argv, "--quiet") == 2, argv
        assert message in _one_line_error(capsys), (argv, message)


def test_lm_eval_pass_through_refuses_clearly(lm_dir, qwen_dir, tmp_path, capsys, monkeypatch):
    real = lm_eval_bridge.importlib.util.find_spec
    monkeypatch.setattr(lm_eval_bridge.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))  # fmt: skip
    assert _eval(tmp_path / "no-model", "--lm-eval", "arc_easy", "--lm-eval-include", tmp_path, "--quiet") == 2
    assert "needs the lm-eval package, which is not installed" in _one_line_error(capsys)  # before loading
    monkeypatch.setattr(lm_eval_bridge.importlib.util, "find_spec", lambda name, *a: object())
    assert _eval(lm_dir, "--lm-eval", "arc_easy", "--quiet") == 2
    assert "give --lm-eval-include DIR" in _one_line_error(capsys)
    assert _eval(lm_dir, "--lm-eval", "arc_easy", "--lm-eval-include", tmp_path / "none", "--quiet") == 2
    assert "is not a directory of lm-eval task configs" in _one_line_error(capsys)
    assert _eval(lm_dir, "--tasks", "none", "--lm-eval", "arc_easy", "--lm-eval-include", tmp_path, "--quiet") == 2
    assert "needs a Hugging Face model with a tokenizer" in _one_line_error(capsys)


def test_without_out_results_go_to_moekit_runs_eval_and_are_never_overwritten_silently(lm_dir, files, tmp_path, capsys):
    out = Path.cwd() / "moekit-runs" / "eval" / lm_dir.name  # the test runs in a directory of its own
    assert _eval(lm_dir, "--data", *files, "--tasks", "perplexity", "--items", "4") == 0
    printed = capsys.readouterr().out
    assert "| perplexity bits/byte" in printed and f"wrote {Path('moekit-runs/eval') / lm_dir.name / 'results.json'}" in printed
    assert _results(out)["runs"][0]["tasks"]["perplexity"]["metrics"]["bits_per_byte"]["n"] == 3
    assert (out / "report.md").read_text().startswith("# moekit eval") and (out / "items.jsonl").is_file()
    assert _eval(lm_dir, "--data", *files, "--tasks", "perplexity", "--quiet") == 2  # an earlier run is there
    assert "already exists and is not empty" in _one_line_error(capsys)
    assert _eval(lm_dir, "--data", *files, "--tasks", "perplexity", "--overwrite", "--quiet") == 0
    (out / "notes.txt").write_text("mine")  # a file moekit did not write: never replaced
    assert _eval(lm_dir, "--data", *files, "--tasks", "perplexity", "--overwrite", "--quiet") == 2
    assert "holds files moekit did not write (notes.txt)" in _one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine"


def test_eval_cpu_kernels_records_what_it_switched_and_scores_alike(qwen_dir, files, tmp_path, capsys):
    """--cpu-kernels: the transformers experts on moekit's implementation, every nn.Linear switched, the weights'
    page move reported; fp32 scores equal to the plain run's, the generations the same."""
    common = [qwen_dir, "--data", *files, "--max-doc-bytes", "50", "--tasks", "perplexity,generate", *SMALL]
    assert _eval(*common, "--out", tmp_path / "plain") == 0
    assert _eval(*common, "--cpu-kernels", "--out", tmp_path / "fast") == 0
    plain, fast = _results(tmp_path / "plain")["runs"][0], _results(tmp_path / "fast")["runs"][0]
    done = fast["model"]["cpu_kernels"]
    assert done["experts_implementation"] == "moekit" and done["linears"] > 0 and done["huge_pages"]
    assert "cpu_kernels" not in plain["model"]
    for a, b in zip(plain["tasks"]["perplexity"]["per_unit"], fast["tasks"]["perplexity"]["per_unit"]):
        assert b["nats"] == pytest.approx(a["nats"], rel=1e-5)
    assert fast["tasks"]["generate"]["metrics"] == plain["tasks"]["generate"]["metrics"]
    assert _eval(*common, "--cpu-kernels", "--device", "cuda", "--out", tmp_path / "gpu") == 2
    assert "--cpu-kernels runs the models on the CPU's kernels; got --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()
