"""``moekit reproduce compression --model DIR``: every method x fraction on tiny Hugging Face Qwen3-MoE and
Mixtral models built from configs (random weights), through moekit compress's streamed pipeline; kept models
reload, the report renders, calibration and evaluation stay disjoint, recovery is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from eval_tiny import byte_tokenizer, text_files  # noqa: E402
from hf_tiny import model_class, tiny_model  # noqa: E402

from moekit.cli.main import main  # noqa: E402
from moekit.evaluation import load_model  # noqa: E402
from moekit.experiments.compression import CompressionConfig  # noqa: E402
from moekit.experiments.compression_model import calibration, model_info, rebatch  # noqa: E402

QUICK = ["reproduce", "compression", "--quick", "--methods", "frequency,reap", "--quiet"]


def _model(directory: Path, family: str) -> Path:
    tiny_model(family).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)  # text data needs a tokenizer
    return directory


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_model_run_covers_every_method_and_fraction_and_keeps_reloadable_models(family, tmp_path):
    src = _model(tmp_path / family, family)
    out = tmp_path / "run"
    assert main([*QUICK, "--model", str(src), "--out", str(out), "--keep-models"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["command"] == f"moekit reproduce compression --quick --methods frequency,reap --recovery-steps 0 --model {src}"
    assert r["data"]["model"]["model_type"] == family and r["data"]["perplexity_metric"] == "bits_per_byte"
    rows = {(row["method"], row["removed"]): row for row in r["rows"]}
    assert set(rows) == {("none", 0.0)} | {(m, f) for m in ("frequency", "reap") for f in (0.25, 0.5)}
    assert not any(row["recovery"] for row in r["rows"])
    control = rows["none", 0.0]
    assert control["metrics"]["continuation_agreement"]["estimate"] == 1.0 and control["metrics"]["kl"]["estimate"] == 0.0
    for (method, removed), row in rows.items():
        assert all(math.isfinite(m["estimate"]) for m in row["metrics"].values()), (method, removed)
        if method == "none":
            continue
        assert set(row["experts_per_layer"]) == {6 - int(6 * removed)} and row["form"] == "plain"
        assert row["params"] < control["params"]
        paired = row["vs_original"]  # on the same documents and items as the original
        assert set(paired) == {"bits_per_byte", "acc"} and paired["bits_per_byte"]["difference"]["n"] == 2
        diff = row["metrics"]["bits_per_byte"]["estimate"] - control["metrics"]["bits_per_byte"]["estimate"]
        assert paired["bits_per_byte"]["difference"]["estimate"] == pytest.approx(diff, abs=1e-9)
        kept = out / row["model_dir"]
        reloaded = model_class(family).from_pretrained(kept)  # plain form: stock transformers
        assert reloaded.config.to_dict()["num_local_experts"] == 6 - int(6 * removed)
        assert load_model(kept).info["parameters"] == row["params"]
        assert json.loads((kept / "compress_report.json").read_text())["method"] == method
    report = (out / "report.md").read_text()
    assert f"Model `{src}` ({family}" in report and "No recovery (Hugging Face models get none" in report and "| reap | 50% | no | 3/3 |" in report
    assert "## Against the original, per seed" in report and "| frequency | 25% | no | 0 |" in report
    assert "vs_original" not in control
    assert (out / "compression_bpb.png").stat().st_size > 1000


def test_models_are_removed_without_keep_models_and_token_id_data_gives_nats_per_token(tmp_path):
    import torch
    from safetensors.torch import save_file

    src = _model(tmp_path / "qwen", "qwen3_moe")
    ids = torch.randint(3, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids[:2]}, str(tmp_path / "calib.safetensors"))
    save_file({"input_ids": ids[2:]}, str(tmp_path / "eval.safetensors"))
    out = tmp_path / "run"
    assert main([*QUICK, "--methods", "frequency", "--removed", "0.5", "--model", str(src), "--calib",
                 str(tmp_path / "calib.safetensors"), "--data", str(tmp_path / "eval.safetensors"), "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    assert not (out / "models").exists() and "model_dir" not in r["rows"][1]
    assert r["data"]["perplexity_metric"] == "nll_per_token" and "acc" not in r["rows"][1]["metrics"]
    assert r["data"]["calibration"]["0"]["tokenizer"] == "token-id files"
    assert "nats/token [95% CI]" in (out / "report.md").read_text()


def test_each_seed_draws_its_own_calibration_sample(tmp_path):
    src = _model(tmp_path / "qwen", "qwen3_moe")
    cfg = CompressionConfig.quick()
    cfg = type(cfg)(**{**cfg.__dict__, "model": str(src), "recovery_steps": 0})
    info = model_info(cfg)
    (a, da), (b, _), (a2, _) = calibration(cfg, info, 0), calibration(cfg, info, 1), calibration(cfg, info, 0)
    assert da["rows"] == cfg.calib_sequences and da["pool_rows"] == 4 * cfg.calib_sequences
    assert [t.shape[0] for t in a] == [cfg.batch_size] * (cfg.calib_sequences // cfg.batch_size)
    assert all((x == y).all() for x, y in zip(a, a2)) and not all((x == y).all() for x, y in zip(a, b))


def test_rebatch_joins_rows_in_order_without_mixing_shapes():
    import torch

    rows = [torch.full((1, 3), i) for i in range(3)] + [torch.full((1, 5), 9)]
    batches = rebatch(rows, 2)
    assert [tuple(b.shape) for b in batches] == [(2, 3), (1, 3), (1, 5)] and batches[1][0, 0] == 2


def test_bad_model_runs_are_refused_before_any_work(tmp_path, capsys):
    src = _model(tmp_path / "qwen", "qwen3_moe")
    files = text_files(tmp_path / "text", count=2, size=600)
    cases = [
        (["--recovery-steps", "5"], "must be 0 for the Hugging Face model"),
        (["--calib", str(files[0]), "--data", f"{files[0]},{files[1]}"], "need disjoint data"),
        (["--removed", "0.1"], "must remove at least one of 6 experts"),
        (["--out", str(src)], "--out"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        out = ["--out", str(tmp_path / "never")] if "--out" not in extra else []
        assert main([*QUICK, "--model", str(src), *extra, *out]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
        assert not (tmp_path / "never").exists()
    assert main([*QUICK, "--keep-models", "--out", str(tmp_path / "never")]) == 2  # no --model
    assert "needs model" in capsys.readouterr().err
    assert main([*QUICK, "--data", str(files[0]), "--out", str(tmp_path / "never")]) == 2
    assert "choose the data of a model (--model) run" in capsys.readouterr().err


def test_moekit_checkpoint_gets_step_matched_recovery_when_asked(tmp_path):
    from eval_tiny import tiny_lm

    from moekit import save_checkpoint

    src = save_checkpoint(tiny_lm(), tmp_path / "lm")  # 2 experts per block
    out = tmp_path / "run"
    assert main([*QUICK, "--methods", "reap,m-smoe", "--removed", "0.5", "--recovery-steps", "2", "--model", str(src),
                 "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    seen = {(row["method"], row["recovery"]): row for row in r["rows"]}
    assert set(seen) == {(m, rec) for m in ("none", "reap", "m-smoe") for rec in (False, True)}
    assert {row["recovery_steps"] for row in r["rows"] if row["recovery"]} == {2}  # step-matched, control too
    for method in ("none", "reap", "m-smoe"):  # recovery changed every model
        one_shot, after = seen[method, False]["metrics"], seen[method, True]["metrics"]
        assert one_shot["bits_per_byte"]["estimate"] != after["bits_per_byte"]["estimate"], method
    assert seen["reap", False]["experts_per_layer"] == [1]
    report = (out / "report.md").read_text()
    assert "Recovery: 2 steps of KD" in report and "| reap | 50% | yes | 1 |" in report
