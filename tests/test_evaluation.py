"""moekit.evaluation: perplexity against a naive per-document computation, intervals on the right
units, deterministic multiple-choice items, an oracle at ~100%, generation of a model against itself,
paired comparisons, documents and token-id files."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval_tiny import MemorisedLM, text_documents, tiny_lm
from moekit.confidence import ratio_interval
from moekit.data.stdlib_corpus import stdlib_split
from moekit.evaluation import (
    Document,
    EvalData,
    EvalSettings,
    build_choice_items,
    build_cloze_items,
    build_prompts,
    compare,
    compare_runs,
    evaluate,
    evaluate_generation,
    evaluate_items,
    evaluate_perplexity,
    load_files,
    load_results,
    repeated_ngrams,
    stdlib_heldout,
    wrap_model,
    write_report,
)
from moekit.evaluation.choice import items_digest
from moekit.evaluation.scoring import rolling_windows

FAST = EvalSettings(items=24, prompts=6, prompt_length=24, new_tokens=8, n_resamples=499)


@pytest.fixture(scope="module")
def data() -> EvalData:
    return EvalData(tuple(Document(f"doc{i}", text=t) for i, t in enumerate(text_documents())), {"name": "test"})


@pytest.mark.parametrize("length", [1, 2, 5, 17, 64, 65, 66, 200])
@pytest.mark.parametrize("context, stride", [(16, 16), (16, 5), (16, 1), (1, 1)])
def test_rolling_windows_predict_every_token_but_the_first_exactly_once(length, context, stride) -> None:
    counted = []
    for begin, end, skip in rolling_windows(length, context, stride):
        assert end - begin <= context + 1 and 0 <= skip < end - begin - 1
        counted += list(range(begin + 1 + skip, end))
    assert counted == list(range(1, length))


@torch.no_grad()
def _naive_nats(module, ids: list[int], context: int, stride: int) -> float:
    """One forward per predicted byte, on exactly the context its window gives it."""
    nats = 0.0
    for begin, end, skip in rolling_windows(len(ids), context, stride):
        for i in range(begin + 1 + skip, end):
            logits = module(torch.tensor([ids[begin:i]]))[0][0, -1]
            nats -= float(F.log_softmax(logits.double(), -1)[ids[i]])
    return nats


@pytest.mark.parametrize("stride", [None, 5])
def test_bits_per_byte_equals_a_naive_per_document_computation(stride) -> None:
    module = tiny_lm(max_seq_len=16)
    docs = [b"x", b"def f(a, b):\n    return a + b\n", text_documents(1, 70)[0], b"ab"]
    data = EvalData(tuple(Document(f"d{i}", text=t) for i, t in enumerate(docs)))
    result = evaluate_perplexity(wrap_model(module), data, stride=stride, batch_size=3, n_resamples=199)
    assert result["skipped"] == ["d0"]  # one byte: nothing to predict
    units = {u["id"]: u for u in result["per_unit"]}
    for i, text in enumerate(docs[1:], start=1):
        u = units[f"d{i}"]
        assert u["tokens"] == u["bytes"] == len(text) - 1
        assert u["nats"] == pytest.approx(_naive_nats(module, list(text), 16, stride or 16), rel=1e-5)
    bits = sum(u["bits"] for u in units.values()) / sum(u["bytes"] for u in units.values())
    assert result["metrics"]["bits_per_byte"]["estimate"] == pytest.approx(bits)
    assert result["metrics"]["nll_per_token"]["estimate"] == pytest.approx(bits * math.log(2))


def test_perplexity_interval_is_a_ratio_of_sums_resampled_over_documents(data) -> None:
    result = evaluate_perplexity(wrap_model(tiny_lm()), data, n_resamples=499, seed=3)
    bits = np.array([u["bits"] for u in result["per_unit"]])
    nbytes = np.array([u["bytes"] for u in result["per_unit"]])
    assert len(set(nbytes.tolist())) > 1  # so a mean of per-document ratios would differ
    interval = result["metrics"]["bits_per_byte"]
    assert interval["n"] == len(data.documents)
    assert interval["estimate"] == pytest.approx(bits.sum() / nbytes.sum())
    expected = ratio_interval(bits, nbytes, n_resamples=499, seed=3)
    assert (interval["low"], interval["high"]) == pytest.approx((expected.low, expected.high))
    ppl = result["metrics"]["perplexity"]
    assert ppl["estimate"] == pytest.approx(math.exp(result["metrics"]["nll_per_token"]["estimate"]))


def _where(data: EvalData, doc_id: str) -> bytes:
    return next(d.text for d in data.documents if d.id == doc_id)


@pytest.mark.parametrize("build", [build_choice_items, build_cloze_items])
def test_items_are_deterministic_and_hold_the_truth_exactly_once(build, data) -> None:
    items = build(data, items=60, seed=5)
    again = build(data, items=60, seed=5)
    assert items == again and items_digest(items) == items_digest(again)
    assert items_digest(build(data, items=60, seed=6)) != items_digest(items)
    assert len(items) == 60 and len({it.document for it in items}) == len(data.documents)
    same_length = []
    for it in items:
        text = _where(data, it.document)
        truth = it.choices[it.answer]
        assert it.choices.count(truth) == 1 and len(set(it.choices)) == len(it.choices) == 4
        assert text[it.offset : it.offset + len(truth)] == truth  # the document really continues so
        assert text[: it.offset].endswith(it.context) and len(it.context) >= 32
        assert text[it.offset + len(truth) :].startswith(it.suffix)
        for j, wrong in enumerate(it.choices):
            if j != it.answer:  # drawn from another document, of the same length where there are enough
                assert any(wrong in d.text for d in data.documents if d.id != it.document)
                same_length.append(len(wrong) == len(truth))
    assert np.mean(same_length) > 0.8
    answers = np.bincount([it.answer for it in items], minlength=4)
    assert answers.min() > 0  # the answer's position is random


def test_items_need_two_text_documents() -> None:
    one = EvalData((Document("only", text=text_documents(1)[0]),))
    with pytest.raises(ValueError, match="at least 2 documents"):
        build_choice_items(one)
    tokens = EvalData((Document("a", tokens=(1, 2, 3)), Document("b", tokens=(4, 5, 6))))
    with pytest.raises(ValueError, match="need text documents"):
        build_cloze_items(tokens)


def test_a_model_that_memorised_the_corpus_gets_every_item_and_few_bits(data) -> None:
    oracle = wrap_model(MemorisedLM([d.text for d in data.documents]))
    for task, build in (("choice", build_choice_items), ("cloze", build_cloze_items)):
        items = build(data, items=40, seed=0)
        result = evaluate_items(oracle, items, data, settings={}, n_resamples=499)
        assert result["metrics"]["acc"]["estimate"] >= 0.95, task
        assert result["metrics"]["acc_norm"]["estimate"] >= 0.95, task
        assert result["chance"] == 0.25
    # with a stride below the context every counted byte has the 12 bytes of context the oracle needs
    ppl = evaluate_perplexity(oracle, data, max_doc_bytes=600, stride=16, n_resamples=199)
    assert ppl["metrics"]["bits_per_byte"]["estimate"] < 0.5  # vs 8 bits for a uniform guess


def test_an_untrained_model_is_near_chance(data) -> None:
    items = build_choice_items(data, items=200, seed=0)
    result = evaluate_items(wrap_model(tiny_lm()), items, data, settings={}, n_resamples=999)
    acc = result["metrics"]["acc"]
    assert abs(acc["estimate"] - 0.25) < 0.08 and acc["low"] < 0.25 + 0.02


def test_repeated_ngrams_by_hand() -> None:
    assert repeated_ngrams([1, 2, 1, 2, 1, 2], 2) == (3, 5)
    assert repeated_ngrams([1, 2, 3, 4], 2) == (0, 3)
    assert repeated_ngrams([7, 7, 7, 7, 7], 1) == (4, 5)
    assert repeated_ngrams([1, 2], 3) == (0, 0)


@pytest.mark.parametrize("same_object", [True, False])
def test_generation_of_a_model_against_itself_agrees_fully(same_object, data) -> None:
    module = tiny_lm()
    model = wrap_model(module)
    reference = model if same_object else wrap_model(copy.deepcopy(module))
    prompts = build_prompts(data, prompts=6, prompt_length=24, new_tokens=8, seed=1)
    result = evaluate_generation(model, prompts, data, reference=reference, new_tokens=8, n_resamples=199)
    m = result["metrics"]
    assert m["kl"]["estimate"] == 0.0 and m["kl"]["low"] == m["kl"]["high"] == 0.0
    assert m["top1_agreement"]["estimate"] == m["continuation_agreement"]["estimate"] == 1.0
    assert m["exact_prefix"]["estimate"] == 8.0
    assert m["repetition"]["estimate"] == m["reference_repetition"]["estimate"]
    for unit in result["per_unit"]:
        assert unit["positions"] == unit["prompt_tokens"] == 24 and unit["new_tokens"] == 8


def test_generation_against_another_model_disagrees(data) -> None:
    prompts = build_prompts(data, prompts=6, prompt_length=24, new_tokens=8, seed=1)
    result = evaluate_generation(wrap_model(tiny_lm(0)), prompts, data, reference=wrap_model(tiny_lm(1)),
                                 new_tokens=8, n_resamples=199)  # fmt: skip
    m = result["metrics"]
    assert m["kl"]["estimate"] > 0.01 and m["continuation_agreement"]["estimate"] < 1.0
    alone = evaluate_generation(wrap_model(tiny_lm(0)), prompts, data, new_tokens=8, n_resamples=199)
    assert set(alone["metrics"]) == {"repetition", "text_repetition"} and alone["reference"] is None


def test_prompts_are_deterministic_line_starts(data) -> None:
    prompts = build_prompts(data, prompts=10, prompt_length=30, new_tokens=4, seed=2)
    assert prompts == build_prompts(data, prompts=10, prompt_length=30, new_tokens=4, seed=2)
    for p in prompts:
        text = _where(data, p.document)
        assert text[p.offset - 1 : p.offset] == b"\n" and text[: p.offset].endswith(p.prompt)
        assert text[p.offset :].startswith(p.continuation)


def test_paired_comparison_of_a_model_with_itself_is_zero_width_at_zero(data) -> None:
    result = evaluate(tiny_lm(), data, reference=tiny_lm(), settings=FAST)
    assert {(r["task"], r["metric"]) for r in result["comparisons"]} >= {
        ("perplexity", "bits_per_byte"), ("choice", "acc"), ("cloze", "acc_norm")}  # fmt: skip
    for row in result["comparisons"]:
        d = row["difference"]
        assert d["estimate"] == d["low"] == d["high"] == 0.0, row
        assert row["verdict"] == "within noise"
    gen = result["runs"][0]["tasks"]["generate"]["metrics"]
    assert gen["kl"]["estimate"] == 0.0 and gen["continuation_agreement"]["estimate"] == 1.0


def test_paired_comparison_pairs_units_and_finds_the_better_model(data) -> None:
    oracle = MemorisedLM([d.text for d in data.documents])
    a = evaluate(oracle, data, tasks=["perplexity", "choice"], settings=FAST)
    b = evaluate(tiny_lm(), data, tasks=["perplexity", "choice"], settings=FAST)
    rows = {(r["task"], r["metric"]): r for r in compare([b["runs"][0], a["runs"][0]], baseline=0)}
    bpb = rows[("perplexity", "bits_per_byte")]
    ra, rb = a["runs"][0]["tasks"]["perplexity"], b["runs"][0]["tasks"]["perplexity"]
    expected = (ra["metrics"]["bits_per_byte"]["estimate"], rb["metrics"]["bits_per_byte"]["estimate"])
    assert bpb["a"] == "MemorisedLM" and bpb["b"] == "MoELM"
    assert bpb["difference"]["estimate"] == pytest.approx(expected[0] - expected[1])
    assert bpb["difference"]["high"] < 0 and bpb["verdict"] == "MemorisedLM better"
    assert bpb["units"] == len(data.documents) and rows[("choice", "acc")]["units"] == FAST.items
    assert rows[("choice", "acc")]["difference"]["low"] > 0
    other = evaluate(tiny_lm(), data, tasks=["choice"], settings=EvalSettings(items=24, seed=9, n_resamples=99))
    with pytest.raises(ValueError, match="not comparable: their items_sha256 differ"):
        compare_runs(a["runs"][0], other["runs"][0])


def test_report_round_trip_compares_with_the_saved_run(data, tmp_path) -> None:
    result = evaluate(tiny_lm(), data, settings=FAST, command=["moekit", "eval", "x"])
    out = write_report(result, tmp_path / "report")
    assert sorted(p.name for p in out.iterdir()) == [".moekit-output.json", "items.jsonl", "report.md", "results.json"]
    saved = load_results(out)
    assert saved["format"] == "moekit-eval" and saved["command"] == ["moekit", "eval", "x"]
    assert saved["data"]["sha256"] == data.digest and "items" not in saved
    lines = (out / "items.jsonl").read_text().splitlines()
    assert len(lines) == 2 * FAST.items + FAST.prompts and json.loads(lines[0])["task"] == "choice"
    rows = compare_runs(result["runs"][0], saved["runs"][0])
    assert rows and all(r["difference"]["high"] == 0.0 for r in rows)
    report = (out / "report.md").read_text()
    assert "bits/byte" in report and "Paired differences" not in report
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        write_report(result, out)
    write_report(result, out, overwrite=True)  # an earlier report of moekit is replaced on request
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by moekit"):
        write_report(result, tmp_path / "foreign", overwrite=True)
    with pytest.raises(ValueError, match="corrupt evaluation results"):
        load_results(tmp_path / "foreign" / "notes.txt")
    (tmp_path / "foreign" / "results.json").write_text('{"format": "moekit"}')
    with pytest.raises(ValueError, match="is not a results.json of moekit eval"):
        load_results(tmp_path / "foreign")


def test_stdlib_heldout_is_disjoint_from_every_training_split() -> None:
    data = stdlib_heldout()
    held = {d.id for d in data.documents}
    split = data.source["split"]
    assert held and split["evaluated"] == "val" and not held & set(split["train_documents"])
    for max_bytes in (2_000_000, 4_000_000):  # moekit merge's calibration text, the experiments' corpus
        files, _ = stdlib_split(max_bytes=max_bytes)
        assert not held & {f.path for f in files if f.split == "train"}
    assert data.describe()["documents"][0]["id"] == data.documents[0].id


def test_documents_from_jsonl_and_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "hello world"}\n\n{"input_ids": [5, 6, 7, 0], "attention_mask": [1, 1, 1, 0]}\n')
    ids = torch.tensor([[0, 0, 3, 4, 5], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "ids.safetensors"))
    data = load_files([jsonl, tmp_path / "ids.safetensors"])
    got = [(d.id.rsplit("/", 1)[-1], d.text, d.tokens) for d in data.documents]
    assert got == [("docs.jsonl:1", b"hello world", None), ("docs.jsonl:3", None, (5, 6, 7)),
                   ("ids.safetensors:0", None, (3, 4, 5)), ("ids.safetensors:1", None, (9, 8, 7, 6, 5))]  # fmt: skip
    save_file({"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1, 1]] * 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="contiguous"):
        load_files([tmp_path / "bad.safetensors"])
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="line 1 needs a string 'text'"):
        load_files([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_files([tmp_path / "missing.txt"])


def test_token_documents_score_on_byte_models_and_refuse_text_tasks() -> None:
    rng = np.random.default_rng(0)
    docs = tuple(Document(f"t{i}", tokens=tuple(rng.integers(0, 256, 90).tolist())) for i in range(3))
    data = EvalData(docs)
    result = evaluate(tiny_lm(), data, tasks=["perplexity", "generate"], settings=FAST)
    ppl = result["runs"][0]["tasks"]["perplexity"]
    assert ppl["metrics"]["bits_per_byte"]["n"] == 3 and all(u["tokens"] == 89 for u in ppl["per_unit"])
    with pytest.raises(ValueError, match="need text documents"):
        evaluate(tiny_lm(), data, tasks=["choice"], settings=FAST)
    bad = EvalData((Document("big", tokens=(1, 300, 2)),))
    with pytest.raises(ValueError, match="token ids outside"):
        evaluate(tiny_lm(), bad, tasks=["perplexity"], settings=FAST)


def test_settings_and_tasks_are_checked(data) -> None:
    with pytest.raises(ValueError, match="items must be >= 1"):
        EvalSettings(items=0)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(tiny_lm(), data, tasks=["perplexity", "mmlu"])
    with pytest.raises(ValueError, match="new_tokens=20 does not fit the context of 'MoELM' \\(16\\)"):
        evaluate(tiny_lm(max_seq_len=16), data, tasks=["generate"], settings=EvalSettings(new_tokens=20))


def test_units_with_one_common_ratio_get_a_zero_width_interval() -> None:
    from moekit.evaluation.metrics import summarise

    same = {"per_unit": [{"id": i, "nats": 0.5 * n, "bits": 2.0 * n, "tokens": n, "bytes": n} for i, n in enumerate([3, 5, 9])]}
    m = summarise("perplexity", same, n_resamples=99)
    assert m["bits_per_byte"] == {"estimate": 2.0, "low": 2.0, "high": 2.0, "n": 3, "level": 0.95, "method": "exact"}
    varied = {"per_unit": [{"id": i, "correct": c} for i, c in enumerate([1, 0, 1, 1, 0, 1])]}
    acc = summarise("choice", varied, n_resamples=999)["acc"]
    assert acc["method"] == "bootstrap-bca" and acc["low"] < 4 / 6 < acc["high"] and acc["n"] == 6
