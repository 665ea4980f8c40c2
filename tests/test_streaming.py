"""Streamed compression of checkpoints (``moekit.merging.streaming``): the same tensors as in memory,
stock-loadable plain forms, kill-and-resume bit identity, guarded run directories, a self-check that fails
on a wrong checkpoint, and the memory bound refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILY_NAMES, generate, model_class, tiny_model, token_batches  # noqa: E402

import moekit  # noqa: E402
from moekit.integrations.hf import family_for, hf_stack, load_hf_model  # noqa: E402
from moekit.merging.lowrank import LowRankOptions  # noqa: E402
from moekit.merging.pipeline import CompressionSpec, moekit_stack, run_pipeline  # noqa: E402
from moekit.merging.streaming import compress_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: one setting per family, so that together they cover both forms, both propagations and both budgets
CASES = {
    "mixtral": CompressionSpec(experts=3, budget="global", form="exact", propagate="original"),
    "qwen2_moe": CompressionSpec(experts=2, budget="uniform", form="plain", propagate="compressed"),
    "qwen3_moe": CompressionSpec(experts=3, budget="global", form="exact", propagate="compressed"),
    "olmoe": CompressionSpec(experts=2, budget="uniform", form="plain", propagate="original"),
    "switch_transformers": CompressionSpec(experts=2, budget="uniform", form="plain", propagate="original"),
    "minimax": CompressionSpec(experts=3, budget="global", form="exact", lowrank=LowRankOptions(rank=4)),
    "flex_olmo": CompressionSpec(experts=2, budget="uniform", form="plain", propagate="original"),
    "deepseek_v2": CompressionSpec(experts=4, budget="global", form="exact"),
    "deepseek_v3": CompressionSpec(experts=4, budget="uniform", form="plain", lowrank=LowRankOptions(rank=3, keep_residual=0.2)),
    "glm4_moe": CompressionSpec(experts=3, budget="uniform", form="exact",
                                lowrank=LowRankOptions(rank=4, recover_steps=3, recover_tokens=32)),
    "dots1": CompressionSpec(experts=3, budget="uniform", form="plain", propagate="original"),
    "gpt_oss": CompressionSpec(experts=3, budget="uniform", form="plain"),
    "granitemoe": CompressionSpec(experts=3, budget="global", form="exact"),
    "granitemoeshared": CompressionSpec(experts=2, budget="uniform", form="plain", lowrank=LowRankOptions(rank=2)),
    "phimoe": CompressionSpec(experts=3, budget="global", form="exact"),
    "ernie4_5_moe": CompressionSpec(experts=3, budget="uniform", form="plain", lowrank=LowRankOptions(rank=4)),
    "hunyuan_v1_moe": CompressionSpec(experts=3, budget="uniform", form="exact", propagate="original"),
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not different, different


def _disk_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streamed_result_equals_in_memory_result(family, tmp_path):
    """Same tensors as the pipeline on the model in memory; plain forms load with stock
    transformers (nothing missing, unexpected or mismatched) and generate; exact forms and compressed
    experts are refused by stock transformers (naming moekit's loader) and load and generate with moekit."""
    spec = CASES[family]
    tiny_model(family).save_pretrained(tmp_path / "in")
    report = compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True)
    in_memory = tiny_model(family)
    run_pipeline(hf_stack(in_memory), token_batches(), spec)
    _assert_same(_state(load_hf_model(tmp_path / "out")), _state(in_memory))
    assert report["verification"]["max_abs_logit_diff"] <= 1e-5
    assert report["weights_bytes_after"] < 0.8 * report["weights_bytes_before"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the run directory became out/
    ids = token_batches(1, batch=2, seq=6, seed=4)[0]
    if spec.form == "plain" and spec.lowrank is None:
        model, info = model_class(family).from_pretrained(tmp_path / "out", output_loading_info=True)
        assert not any(info.values()), info
        assert getattr(model.config, family_for(model).experts_key) == spec.experts
    else:  # stock transformers refuses the exact form and compressed experts, naming moekit's loader
        with pytest.raises(ValueError, match="moekit.load_hf_model"):
            model_class(family).from_pretrained(tmp_path / "out")
        model = load_hf_model(tmp_path / "out")
    with torch.no_grad():
        assert generate(model.eval(), ids).shape[0] == 2


def test_moekit_checkpoint_streamed_equals_merge_moekit_model(tmp_path):
    batches = _lm_checkpoint(tmp_path / "lm")
    lm = moekit.load_checkpoint(tmp_path / "lm").eval()
    spec = CompressionSpec(experts=3, budget="global", form="exact", propagate="original")
    compress_checkpoint(tmp_path / "lm", tmp_path / "out", batches, spec, quiet=True)
    merged = moekit.merge_moekit_model(lm, batches, experts=3, form="exact", quiet=True)
    _assert_same(_state(moekit.load_checkpoint(tmp_path / "out")), _state(merged))
    # sequential propagation, plain form, per-layer counts (moekit configs hold them)
    spec = CompressionSpec(experts=3, budget="global", form="plain", propagate="compressed")
    compress_checkpoint(tmp_path / "lm", tmp_path / "seq", batches, spec, quiet=True)
    stack = moekit_stack(moekit.load_checkpoint(tmp_path / "lm").eval())
    run_pipeline(stack, batches, spec)
    _assert_same(_state(moekit.load_checkpoint(tmp_path / "seq")), _state(stack.model))


def _lm_checkpoint(directory: Path) -> list[torch.Tensor]:
    torch.manual_seed(0)
    lm = moekit.MoELM(dim=32, depth=3, heads=2, max_seq_len=32, num_experts=6, k=2, hidden=40).eval()
    moekit.save_checkpoint(lm, directory)
    return [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]


KILLER = """
import os, signal, sys
import safetensors.torch as st
import torch
from moekit.merging.pipeline import CompressionSpec
from moekit.merging.streaming import compress_checkpoint
kill_at, calls, save = int(sys.argv[1]), [0], st.save_file
def save_file(tensors, path, metadata=None):
    calls[0] += 1
    if calls[0] == kill_at:  # die half-way through writing this file
        with open(path, "wb") as f:
            f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    save(tensors, path, metadata=metadata)
st.save_file = save_file
batches = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
spec = CompressionSpec(experts=3, budget="global", form="exact", propagate="compressed")
compress_checkpoint(sys.argv[2], sys.argv[3], batches, spec, quiet=True, resume=sys.argv[4] == "1")
"""


def test_kill_at_any_point_and_resume_gives_identical_tensors(tmp_path):
    batches = _lm_checkpoint(tmp_path / "in")
    spec = CompressionSpec(experts=3, budget="global", form="exact", propagate="compressed")
    compress_checkpoint(tmp_path / "in", tmp_path / "whole", batches, spec, quiet=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # SIGKILLed while writing the 3rd file (hidden states of the observe phase), then, resumed, while
    # writing its 6th (the compress phase's shards); a third run finishes
    for kill_at, resume in ((3, "0"), (6, "1")):
        args = [sys.executable, "-c", KILLER, str(kill_at), str(tmp_path / "in"), str(tmp_path / "out"), resume]
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        assert done.returncode == -9, done.stderr
        assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    report = compress_checkpoint(tmp_path / "in", tmp_path / "out", batches, spec, quiet=True, resume=True)
    assert report["resumed"]
    _assert_same(_disk_tensors(tmp_path / "out"), _disk_tensors(tmp_path / "whole"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((tmp_path / "whole" / "config.json").read_text())


def test_interrupted_hf_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    import safetensors.torch as st

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "in")
    spec = CompressionSpec(experts=3, budget="uniform", form="plain", propagate="compressed")
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
    _assert_same(_disk_tensors(tmp_path / "out"), _disk_tensors(tmp_path / "whole"))


def test_run_directory_guards(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path / "in")
    spec = CompressionSpec(experts=2, budget="uniform", form="exact")
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("not moekit's")
    with pytest.raises(FileExistsError, match="was not made by moekit"):
        compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True)
    assert (partial / "mine.txt").read_text() == "not moekit's"
    (partial / "mine.txt").unlink()
    partial.rmdir()
    from moekit.merging.resume import RunDirectory

    RunDirectory(tmp_path / "out", {"a": 1}, resume=False, overwrite=False)  # an interrupted run of other settings
    with pytest.raises(FileExistsError, match="rerun the same command with --resume"):
        compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True)
    with pytest.raises(ValueError, match="started with other settings"):
        compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True, resume=True)
    with pytest.raises(ValueError, match="lies inside the input"):
        compress_checkpoint(tmp_path / "in", tmp_path / "in" / "sub", token_batches(), spec, quiet=True)


def test_self_check_refuses_a_checkpoint_with_a_dropped_tensor(tmp_path, monkeypatch):
    from moekit.integrations.hf.checkpoint import HFShardWriter

    tiny_model("mixtral").save_pretrained(tmp_path / "in")
    write_unit = HFShardWriter.write_unit

    def dropping(self, index, name, module):  # a writer bug: the router of layer 1 goes missing
        write_unit(self, index, name, module)
        if index == 1:
            from safetensors.torch import load_file, save_file

            path = self._path(index)
            tensors = {k: v for k, v in load_file(str(path)).items() if ".gate." not in k}
            save_file(tensors, str(path))

    monkeypatch.setattr(HFShardWriter, "write_unit", dropping)
    spec = CompressionSpec(experts=2, budget="uniform", form="plain")
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.gate.weight"):
        compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, quiet=True)
    assert not (tmp_path / "out").exists()


def test_memory_bound_is_checked_before_the_run(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path / "in")
    spec = CompressionSpec(experts=2, budget="uniform", form="exact")
    with pytest.raises(ValueError, match=r"--max-memory 1.00 MB is too small.*give at least"):
        compress_checkpoint(tmp_path / "in", tmp_path / "out", token_batches(), spec, max_memory=10**6, quiet=True)
    assert not (tmp_path / ".out.partial").exists()
