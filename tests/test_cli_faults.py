"""Every CLI command against a table of bad arguments and faulty inputs.

Each case must end with exit code 2 and one line on stderr, ``<prog>: error: ...``, that names the
argument (or the file) at fault -- no traceback, no load report, no progress bar -- while every input
stays byte-identical (sha256 of every file before and after) and nothing is left at ``--out`` (an
``--out`` that existed is unchanged) nor beside it (no staging debris).

Commands run in this process (``moekit.cli.main.main``), so each case takes milliseconds: every
check runs before any work.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import MoELM, save_checkpoint
from moekit.cli._distributed_train import main as distributed_main
from moekit.cli.main import main
from moekit.distributed import save_distributed_checkpoint
from moekit.distributed.model import ep_moe_classifier
from moekit.models.classifier import MoEClassifier
from moekit.reporting import atomic_directory

pytest.importorskip("transformers")

from hf_tiny import tiny_model  # noqa: E402

CLF_CONFIG = dict(in_dim=64, num_classes=10, dim=16, num_experts=4, router="topk")
EP_CONFIG = dict(in_dim=64, num_classes=10, dim=16, num_experts=4)
LM_CONFIG = dict(dim=16, depth=1, heads=2, num_experts=4, k=2, hidden=24, max_seq_len=32)


def _edit_safetensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None], name: str) -> None:
    state = load_file(str(directory / name))
    edit(state)
    save_file(state, str(directory / name), metadata={"format": "pt"})


def _edit_config(directory: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((directory / "config.json").read_text())
    edit(meta)
    (directory / "config.json").write_text(json.dumps(meta))


def _nan(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")

    return edit


def _build_inputs(root: Path) -> None:
    """Good inputs and one faulty copy per fault, all under ``root`` (hashed around every case)."""
    torch.manual_seed(0)
    save_checkpoint(MoEClassifier(**CLF_CONFIG), root / "clf", config=CLF_CONFIG)
    save_checkpoint(MoELM(**LM_CONFIG), root / "lm")
    tiny_model("mixtral").save_pretrained(root / "hf")
    (root / "calib.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (root / "empty.txt").write_text("")
    (root / "latin1.json").write_bytes(b'{"experiment": "caf\xe9"}')
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (root / "a_file").write_text("not a directory")
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"")

    def variant(src: str, name: str, change: Callable[[Path], None]) -> None:
        shutil.copytree(root / src, root / name)
        change(root / name)

    variant("lm", "lm_bad_json", lambda d: (d / "config.json").write_text("{not json"))
    variant("lm", "lm_list_json", lambda d: (d / "config.json").write_text("[1, 2]"))
    variant("lm", "lm_unknown_model", lambda d: _edit_config(d, lambda m: m.update(model="nope")))
    variant("lm", "lm_newer", lambda d: _edit_config(d, lambda m: m.update(version=99)))
    variant("lm", "lm_absurd", lambda d: _edit_config(d, lambda m: m["config"].update(num_experts=10**6, hidden=10**6)))
    variant("lm", "lm_absurd_dim", lambda d: _edit_config(d, lambda m: m["config"].update(dim=10**9)))
    variant("clf", "clf_comet_huge", lambda d: _edit_config(d, lambda m: m["config"].update(router="comet", num_experts=10**5)))
    variant("lm", "lm_bad_value", lambda d: _edit_config(d, lambda m: m["config"].update(num_experts=-3)))
    variant("lm", "lm_bad_kwarg", lambda d: _edit_config(d, lambda m: m["config"].update(colour="red")))
    variant("lm", "lm_no_weights", lambda d: (d / "model.safetensors").unlink())
    variant("lm", "lm_truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]))
    variant("lm", "lm_int32", lambda d: _edit_safetensors(d, lambda s: s.update({"head.weight": s["head.weight"].to(torch.int32)}), "model.safetensors"))
    variant("lm", "lm_nan", lambda d: _edit_safetensors(d, _nan("head.weight"), "model.safetensors"))
    variant("lm", "lm_missing", lambda d: _edit_safetensors(d, lambda s: s.pop("head.weight"), "model.safetensors"))
    variant("clf", "clf_truncated", lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"))
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    variant("hf", "hf_missing_gate", lambda d: _edit_safetensors(d, lambda s: s.pop(gate), "model.safetensors"))
    variant("hf", "hf_unexpected", lambda d: _edit_safetensors(d, lambda s: s.update(extra=torch.zeros(3)), "model.safetensors"))
    variant("hf", "hf_mismatched", lambda d: _edit_safetensors(d, lambda s: s.update({gate: torch.zeros(7, 32)}), "model.safetensors"))
    variant("hf", "hf_nan", lambda d: _edit_safetensors(d, _nan(gate), "model.safetensors"))
    variant("hf", "hf_truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]))
    variant("hf", "hf_bin_only", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))
    variant("hf", "hf_absurd_experts", lambda d: _edit_config(d, lambda m: m.update(num_local_experts=10**4)))
    variant("hf", "hf_bert", lambda d: _edit_config(d, lambda m: m.update(model_type="bert")))
    # an experiment run directory written by moekit, holding a checkpoint (what `moekit analyze` reads)
    with atomic_directory(root / "run") as stage:
        save_checkpoint(MoEClassifier(**CLF_CONFIG), stage / "checkpoints" / "r0", config=CLF_CONFIG)
        runs = {"config": {"data": "digits-flat"}, "runs": [{"name": "r0", "checkpoint": "checkpoints/r0"}]}
        (stage / "results.json").write_text(json.dumps(runs))
    (root / "results.json").write_text(json.dumps({"experiment": "demo", "runs": []}))
    save_distributed_checkpoint(ep_moe_classifier(**EP_CONFIG), root / "ep", name="ep_moe_classifier", config=EP_CONFIG)
    variant("ep", "ep_absurd", lambda d: _edit_config(d, lambda m: m["config"].update(num_experts=10**5)))
    variant("ep", "ep_nan", lambda d: _edit_safetensors(d, _nan("head.weight"), "dense.safetensors"))
    (root / "ids_bad.json").write_text('{"not": "rows"}')
    (root / "ids_big.json").write_text(json.dumps([[1, 2, 999] * 4] * 2))
    variant("hf", "hf_exact", lambda d: _edit_config(d, lambda m: m.update(moekit_merge={"form": "exact", "layers": {}})))
    (root / "run_corrupt").mkdir()
    (root / "run_corrupt" / "results.json").write_text("{oops")
    (root / "run_empty").mkdir()
    (root / "run_empty" / "results.json").write_text('{"runs": []}')


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    _build_inputs(root)
    return root


DISTRIBUTED = "python -m moekit.distributed.train"


@dataclass(frozen=True)
class Fault:
    """``argv`` (split like a shell line) with ``{I}`` (the inputs directory) and ``{O}`` (the case's
    --out); ``match``: a piece of the error line (it names the argument or file); ``prog``: the error
    prefix (default ``moekit <command>``)."""

    argv: str
    match: str
    prog: str | None = None


#: a valid run of every command that writes a directory, as quick as each allows
COMMANDS = {
    "demo": "demo --quick --routers topk --quiet",
    "merge-moekit": "merge {I}/lm --experts 2 --calib {I}/calib.txt --quiet",
    "merge-hf": "merge {I}/hf --experts 2 --calib {I}/calib.txt --quiet",
    "compress-moekit": "compress {I}/lm --experts 2 --calib {I}/calib.txt --quiet",
    "compress-hf": "compress {I}/hf --experts 2 --calib {I}/calib.txt --quiet",
    "analyze": "analyze {I}/clf --quiet",
    "analyze-run": "analyze {I}/run --quiet",
    "analyze-hf": "analyze {I}/hf --calib {I}/calib.txt --quiet",
    "eval": "eval {I}/lm --data {I}/calib.txt --tasks perplexity --quiet",
    "report": "report {I}/results.json --quiet",
    "reproduce-constraints": "reproduce constraints --quick --quiet",
    "reproduce-smear": "reproduce smear --quick --quiet",
    "reproduce-comet": "reproduce comet --quick --quiet",
    "reproduce-mcsmoe": "reproduce mcsmoe --quick --quiet",
    "reproduce-compression": "reproduce compression --quick --quiet",
}

#: faults of --out that every command must refuse before any work (set up by _prepare_out)
OUT_FAULTS = {
    "out-is-a-file": ("", "--out '{O}' exists and is not a directory"),
    "out-user-dir": ("", "--out '{O}' already exists and is not empty"),
    "out-user-dir-overwrite": ("--overwrite", "--out '{O}' was not written by moekit"),
    "out-moekit-dir-with-user-file": ("--overwrite", "--out '{O}' holds files moekit did not write (notes.txt)"),
    "out-under-a-file": ("", "is not a directory"),
    "out-in-proc": ("", "is not writable"),
    "out-symlink": ("", "--out '{O}' is a symbolic link"),
}

def _prepare_out(fault: str, tmp: Path) -> Path:
    out = tmp / "out"
    if fault == "out-is-a-file":
        out.write_text("precious")
    elif fault in ("out-user-dir", "out-user-dir-overwrite"):
        out.mkdir()
        (out / "results.json").write_text("{}")  # looks like a report; moekit did not write it
        (out / "thesis.tex").write_text("precious")
    elif fault == "out-moekit-dir-with-user-file":
        with atomic_directory(out) as stage:
            (stage / "report.md").write_text("old report")
        (out / "notes.txt").write_text("precious")
    elif fault == "out-under-a-file":
        (tmp / "file").write_text("precious")
        out = tmp / "file" / "out"
    elif fault == "out-in-proc":
        out = Path("/proc/moekit-test-out")
    elif fault == "out-symlink":
        (tmp / "target").mkdir()
        out.symlink_to(tmp / "target")
    return out


#: faulty model directories (built by _build_inputs) and the error naming what is wrong; every command
#: that loads a model (merge, analyze, eval) must give it before any work
MODEL_FAULTS = {
    "missing-input": ("nope", "'{I}/nope'"),
    "input-is-a-file": ("a_file", "'{I}/a_file'"),
    "no-config": ("no_config", "'{I}/no_config' has no config.json"),
    "invalid-json": ("lm_bad_json", "'{I}/lm_bad_json/config.json'"),
    "json-not-a-config": ("lm_list_json", "is neither a moekit checkpoint"),
    "unknown-moekit-model": ("lm_unknown_model", "names model 'nope', which is not registered"),
    "newer-format-version": ("lm_newer", "has format version 99, newer than this moekit reads"),
    "absurd-sizes": ("lm_absurd", "hidden=1000000 exceeds the largest tensor extent (256) of its weights"),
    "absurd-size-overflow": ("lm_absurd_dim", "dim=1000000000 exceeds the largest tensor extent (256)"),
    "absurd-router-table": ("clf_comet_huge", "num_experts=100000 exceeds the largest tensor extent (64)"),
    "bad-config-value": ("lm_bad_value", "num_experts must be >= 1, got -3"),
    "bad-config-key": ("lm_bad_kwarg", "does not fit 'moe_lm'"),
    "no-weights": ("lm_no_weights", "checkpoint '{I}/lm_no_weights' has no model.safetensors"),
    "truncated-weights": ("lm_truncated", "corrupt checkpoint weights '{I}/lm_truncated/model.safetensors'"),
    "int32-weights": ("lm_int32", "tensors of the wrong dtype: head.weight (int32, expected float32)"),
    "nan-weights": ("lm_nan", "hold NaN/inf values in tensors head.weight"),
    "missing-tensor": ("lm_missing", "missing tensors head.weight"),
    "hf-missing-gate": ("hf_missing_gate", "missing tensors model.layers.0.mlp.gate.weight"),
    "hf-unexpected-tensor": ("hf_unexpected", "unexpected tensors extra"),
    "hf-mismatched-shape": ("hf_mismatched", "gate.weight (found [7, 32], expected [6, 32])"),
    "hf-nan-weights": ("hf_nan", "hold NaN/inf values in tensors model.layers.0.mlp.gate.weight"),
    "hf-truncated": ("hf_truncated", "'{I}/hf_truncated'"),
    "hf-pytorch-bin-only": ("hf_bin_only", "holds only pytorch_model.bin (a pickle): moekit reads only"),
    "hf-unsupported-family": ("hf_bert", "'bert'"),
    "hf-absurd-experts": ("hf_absurd_experts", "num_local_experts=10000 exceeds the largest tensor extent"),
}
MODEL_COMMANDS = {
    "merge": "merge {M} --calib {I}/calib.txt --quiet --out {O} --experts 2",
    "compress": "compress {M} --calib {I}/calib.txt --quiet --out {O} --experts 2",
    "analyze": "analyze {M} --calib {I}/calib.txt --quiet --out {O}",
    "eval": "eval {M} --data {I}/calib.txt --tasks perplexity --quiet --out {O}",
}
#: faults a command reports in its own words (an unsupported family is not an error for eval: any causal LM)
MODEL_FAULT_MATCH = {
    ("analyze", "missing-input"): "'{I}/nope' is not a directory",
    ("analyze", "no-config"): "'{I}/no_config' has no results.json: not an experiment output directory",
    ("eval", "hf-unsupported-family"): None,
    ("merge", "absurd-router-table"): "holds a 'moe_classifier' model; text calibration needs a moekit language model",
    ("eval", "absurd-router-table"): "holds a 'moe_classifier' model; moekit eval needs a language model",
    ("compress", "hf-nan-weights"): "hold NaN/inf values in tensors model.layers.0.block_sparse_moe.gate.weight",
    ("compress", "hf-truncated"): "cannot read '{I}/hf_truncated/model.safetensors'",
    ("compress", "hf-absurd-experts"): "gate.weight (found [6, 32], expected [10000, 32])",
}

FAULTS = {
    f"{command}:{fault}": Fault(f"{argv} --out {{O}} {extra}", match)
    for command, argv in COMMANDS.items()
    for fault, (extra, match) in OUT_FAULTS.items()
}
FAULTS.update({
    f"{command}:{fault}": Fault(argv.replace("{M}", f"{{I}}/{model}"), MODEL_FAULT_MATCH.get((command, fault), match))
    for command, argv in MODEL_COMMANDS.items()
    for fault, (model, match) in MODEL_FAULTS.items()
    if MODEL_FAULT_MATCH.get((command, fault), match) is not None
})  # fmt: skip
_M = "merge --calib {I}/calib.txt --quiet --out {O} --experts 2"
_A = "analyze --quiet --out {O}"
_C = "compress --calib {I}/calib.txt --quiet --out {O} --experts 2"
_E = "eval --data {I}/calib.txt --tasks perplexity --quiet --out {O}"
_R = "reproduce {} --quick --quiet --out {{O}}"
FAULTS.update({case: Fault(argv, match) for case, argv, match in [
    # --out overlapping an input: the data-loss bugs of issue 11
    ("analyze:out-is-the-checkpoint", "analyze {I}/clf --out {I}/clf --overwrite", "--out '{I}/clf' is the input '{I}/clf'"),
    ("analyze:out-contains-the-checkpoint", "analyze {I}/clf --out {I} --overwrite", "--out '{I}' contains the input '{I}/clf'"),
    ("analyze:out-is-the-run-dir", "analyze {I}/run --out {I}/run --overwrite", "--out '{I}/run' is the input '{I}/run'"),
    ("analyze:out-inside-the-checkpoint", "analyze {I}/clf --out {I}/clf/analysis",
     "--out '{I}/clf/analysis' lies inside the input '{I}/clf'"),
    ("analyze:out-is-the-calibration-file", "analyze {I}/hf --calib {I}/calib.txt --out {I}/calib.txt --overwrite",
     "--out '{I}/calib.txt' is the input '{I}/calib.txt'"),
    ("merge:out-is-the-input", "merge {I}/lm --experts 2 --out {I}/lm --overwrite", "--out '{I}/lm' is the input '{I}/lm'"),
    ("merge:out-contains-the-input", "merge {I}/hf --experts 2 --out {I} --overwrite", "--out '{I}' contains the input '{I}/hf'"),
    ("merge:out-inside-the-input", "merge {I}/hf --experts 2 --out {I}/hf/m", "--out '{I}/hf/m' lies inside the input '{I}/hf'"),
    ("merge:out-is-the-calibration-file", "merge {I}/lm --experts 2 --calib {I}/calib.txt --out {I}/calib.txt --overwrite",
     "--out '{I}/calib.txt' is the input '{I}/calib.txt'"),
    ("eval:out-is-the-model", "eval {I}/lm --out {I}/lm --overwrite", "--out '{I}/lm' is the input '{I}/lm'"),
    ("eval:out-contains-the-reference", "eval {I}/lm --reference {I}/hf --out {I} --overwrite",
     "--out '{I}' contains the input '{I}/lm'"),
    ("eval:out-is-the-data", "eval {I}/lm --data {I}/calib.txt --out {I}/calib.txt --overwrite",
     "--out '{I}/calib.txt' is the input '{I}/calib.txt'"),
    ("report:out-contains-the-results", "report {I}/results.json --out {I} --overwrite",
     "--out '{I}' contains the input '{I}/results.json'"),
    ("constraints:out-inside-the-data-dir", "reproduce constraints --data cifar10 --data-dir {I} --out {I}/report",
     "--out '{I}/report' lies inside the input '{I}'"),
    ("comet:out-is-the-idx-dir", "reproduce comet --quick --idx-dir {I} --out {I} --overwrite",
     "--out '{I}' is the input '{I}'"),
    # merge: bad numbers and names
    ("merge:experts-0", f"{_M} {{I}}/lm --experts 0", "argument --experts: must be >= 1, got 0"),
    ("merge:experts-not-a-number", f"{_M} {{I}}/lm --experts two", "argument --experts: must be an integer, got 'two'"),
    ("merge:experts-too-many", f"{_M} {{I}}/hf --experts 9", "--experts must be between 1 and 6"),
    ("merge:calib-samples-0", f"{_M} {{I}}/lm --calib-samples 0", "argument --calib-samples: must be >= 1, got 0"),
    ("merge:seq-len-0", f"{_M} {{I}}/lm --seq-len 0", "argument --seq-len: must be >= 1, got 0"),
    ("merge:batch-size-0", f"{_M} {{I}}/lm --batch-size 0", "argument --batch-size: must be >= 1, got 0"),
    ("merge:unknown-method", f"{_M} {{I}}/lm --method nope", "unknown merge method 'nope'"),
    ("merge:unknown-budget", f"{_M} {{I}}/lm --budget nope", "argument --budget: invalid choice: 'nope'"),
    ("merge:unknown-grouping", f"{_M} {{I}}/lm --grouping nope", "argument --grouping: invalid choice: 'nope'"),
    ("merge:unknown-form", f"{_M} {{I}}/lm --form nope", "argument --form: invalid choice: 'nope'"),
    ("merge:missing-calib-file", "merge {I}/lm --experts 2 --out {O} --calib {I}/nope.txt",
     "calibration file '{I}/nope.txt' does not exist"),
    ("merge:empty-calib-file", "merge {I}/lm --experts 2 --out {O} --calib {I}/empty.txt", "is empty"),
    ("merge:exclude-unknown-layer", f"{_M} {{I}}/lm --exclude nope", "--exclude names ['nope'], which are not MoE layers"),
    ("merge:no-input", "merge --experts 2 --out {O}", "the following arguments are required: input"),
    ("merge:exact-form-input", f"{_M} {{I}}/hf_exact", "already merged (exact form)"),
    # compress: overlapping --out, bad numbers and names
    ("compress:out-is-the-input", "compress {I}/lm --experts 2 --out {I}/lm --overwrite", "--out '{I}/lm' is the input"),
    ("compress:out-inside-the-input", "compress {I}/hf --experts 2 --out {I}/hf/c", "lies inside the input '{I}/hf'"),
    ("compress:experts-0", f"{_C} {{I}}/lm --experts 0", "argument --experts: must be >= 1, got 0"),
    ("compress:experts-too-many", f"{_C} {{I}}/hf --experts 9", "--experts"),
    ("compress:unknown-method", f"{_C} {{I}}/lm --method nope", "'nope'"),
    ("compress:unknown-form", f"{_C} {{I}}/lm --form nope", "argument --form: invalid choice: 'nope'"),
    ("compress:max-memory-not-a-size", f"{_C} {{I}}/lm --max-memory lots", "--max-memory"),
    ("compress:max-memory-too-small", f"{_C} {{I}}/lm --max-memory 1KB", "--max-memory"),
    ("compress:rank-0", f"{_C} {{I}}/lm --rank 0", "argument --rank: must be >= 1, got 0"),
    ("compress:seq-len-0", f"{_C} {{I}}/lm --seq-len 0", "argument --seq-len: must be >= 1, got 0"),
    ("compress:missing-calib-file", "compress {I}/lm --experts 2 --out {O} --calib {I}/nope.txt", "'{I}/nope.txt'"),
    ("compress:exclude-unknown-block", f"{_C} {{I}}/lm --exclude nope", "'nope'"),
    # analyze: faulty inputs and bad numbers
    ("analyze:corrupt-results", f"{_A} {{I}}/run_corrupt", "corrupt experiment results '{I}/run_corrupt/results.json'"),
    ("analyze:run-without-checkpoints", f"{_A} {{I}}/run_empty", "lists no run with a saved checkpoint"),
    ("analyze:unknown-run", "analyze {I}/run --run r9 --out {O}", "--run 'r9' not found"),
    ("analyze:max-examples-0", f"{_A} {{I}}/clf --max-examples 0", "--max-examples must be >= 1, got 0"),
    ("analyze:image-size-0", f"{_A} {{I}}/clf --image-size 0", "--image-size must be >= 8, got 0"),
    ("analyze:seq-len-1", f"{_A} {{I}}/lm --seq-len 1", "--seq-len must be >= 2, got 1"),
    ("analyze:batch-size-not-a-number", f"{_A} {{I}}/clf --batch-size many", "argument --batch-size: invalid int value"),
    ("analyze:unknown-data", f"{_A} {{I}}/clf --data nope", "'nope'"),
    ("analyze:cifar-without-data-dir", f"{_A} {{I}}/clf --data cifar10", "cifar10"),
    ("analyze:calib-for-a-classifier", f"{_A} {{I}}/clf --calib {{I}}/calib.txt", "--calib is for language models"),
    ("analyze:missing-calib-file", f"{_A} {{I}}/lm --calib {{I}}/nope.txt", "'{I}/nope.txt' does not exist"),
    ("analyze:corrupt-token-ids", f"{_A} {{I}}/lm --calib {{I}}/ids_bad.json", "--calib '{I}/ids_bad.json' must be"),
    ("analyze:token-ids-beyond-vocab", f"{_A} {{I}}/lm --calib {{I}}/ids_big.json", "token ids go up to 999"),
    ("analyze:ep-absurd-config", f"{_A} {{I}}/ep_absurd", "num_experts=100000 exceeds the largest tensor extent"),
    ("analyze:ep-nan-weights", f"{_A} {{I}}/ep_nan", "hold NaN/inf values in tensors head.weight"),
    ("analyze:list-runs-of-a-checkpoint", "analyze {I}/lm --list-runs", "has no results.json: not an experiment output"),
    # eval: bad numbers, names and files
    ("eval:threads-0", f"{_E} {{I}}/lm --threads 0", "--threads must be >= 1, got 0"),
    ("eval:items-0", f"{_E} {{I}}/lm --items 0", "items must be >= 1, got 0"),
    ("eval:unknown-task", "eval {I}/lm --data {I}/calib.txt --tasks nope --out {O}", "'nope'"),
    ("eval:no-task", "eval {I}/lm --tasks none --out {O}", "nothing to do"),
    ("eval:missing-data-file", "eval {I}/lm --data {I}/nope.txt --out {O}", "'{I}/nope.txt'"),
    ("eval:compare-not-results", f"{_E} {{I}}/lm --compare {{I}}/calib.txt", "'{I}/calib.txt'"),
    ("eval:missing-reference", f"{_E} {{I}}/lm --reference {{I}}/nope", "'{I}/nope'"),
    ("eval:classifier-is-not-an-lm", f"{_E} {{I}}/clf", "moekit eval needs a language model"),
    ("eval:unknown-device", f"{_E} {{I}}/lm --device quantum", "argument --device: must be a torch device"),
    ("eval:stdlib-bytes-0", f"{_E} {{I}}/lm --stdlib-bytes 0", "argument --stdlib-bytes: must be >= 1024, got 0"),
    ("eval:max-doc-bytes-0", f"{_E} {{I}}/lm --max-doc-bytes 0", "max_doc_bytes must be >= 1, got 0"),
    ("eval:data-not-utf8", "eval {I}/lm --data {I}/latin1.jsonl --tasks perplexity --quiet --out {O}",
     "'{I}/latin1.jsonl' is not UTF-8 text"),
    ("merge:calib-not-utf8", "merge {I}/lm --experts 2 --calib {I}/latin1.jsonl --quiet --out {O}",
     "--calib '{I}/latin1.jsonl' is not UTF-8 text"),
    ("eval:stride-0", f"{_E} {{I}}/lm --stride 0", "stride must be >= 1, got 0"),
    ("eval:context-1", f"{_E} {{I}}/lm --context 1", "context must be >= 2, got 1"),
    ("eval:distractors-0", f"{_E} {{I}}/lm --distractors 0", "distractors must be >= 1, got 0"),
    ("eval:prompts-0", f"{_E} {{I}}/lm --prompts 0", "prompts must be >= 1, got 0"),
    ("eval:new-tokens-0", f"{_E} {{I}}/lm --new-tokens 0", "new_tokens must be >= 1, got 0"),
    ("eval:prompt-length-0", f"{_E} {{I}}/lm --prompt-length 0", "prompt_length must be >= 1, got 0"),
    ("eval:documents-not-a-number", f"{_E} {{I}}/lm --documents all", "argument --documents: invalid int value: 'all'"),
    # report: faulty results files
    ("report:missing-results", "report {I}/nope.json --out {O}", "results file '{I}/nope.json' does not exist"),
    ("report:not-json", "report {I}/calib.txt --out {O}", "'{I}/calib.txt' is not valid JSON"),
    ("report:not-utf8", "report {I}/latin1.json --out {O}", "'{I}/latin1.json' is not valid JSON"),
    ("report:not-an-experiment", "report {I}/lm/config.json --out {O}", "is not a moekit results file"),
    ("report:nothing-given", "report --out {O}", "give a RESULTS.json, a --doc DOC.md, or both"),
    ("report:missing-doc", "report --doc {I}/nope.md", "--doc '{I}/nope.md' does not exist"),
    ("report:check-without-doc", "report {I}/results.json --check", "--check compares documents with their results: give --doc"),
    ("report:incomplete-results", "report {I}/results.json --out {O}",
     "results file '{I}/results.json' is not a complete 'demo' results file: it lacks"),
    # demo and reproduce: bad numbers and names
    ("demo:epochs-0", "demo --epochs 0 --out {O}", "--epochs must be >= 1, got 0"),
    ("demo:experts-1", "demo --quick --experts 1 --out {O}", "--experts must be >= 2, got 1"),
    ("demo:threads-0", "demo --quick --threads 0 --out {O}", "--threads must be >= 1, got 0"),
    ("demo:lr-nan", "demo --quick --lr nan --out {O}", "--lr must be a finite number, got 'nan'"),
    ("demo:seeds-not-ints", "demo --quick --seeds a,b --out {O}", "--seeds must be comma-separated integers, got 'a,b'"),
    ("demo:unknown-router", "demo --quick --routers nope --out {O}", "routers has unknown names ['nope']"),
    ("demo:unknown-option", "demo --quick --rooters topk --out {O}", "unrecognized arguments: --rooters topk"),
    ("constraints:epochs-0", f"{_R.format('constraints')} --epochs 0", "--epochs must be >= 1, got 0"),
    ("constraints:positions-9", f"{_R.format('constraints')} --positions 9", "positions must be in 1..4, got 9"),
    ("constraints:seeds-not-ints", f"{_R.format('constraints')} --seeds a,b", "--seeds must be comma-separated integers"),
    ("constraints:width-0", f"{_R.format('constraints')} --width 0", "--width must be >= 1, got 0"),
    ("constraints:num-test-0", f"{_R.format('constraints')} --num-test 0", "--num-test must be >= 1, got 0"),
    ("constraints:unknown-constraint", f"{_R.format('constraints')} --constraints nope", "'nope'"),
    ("constraints:unknown-data", f"{_R.format('constraints')} --data nope", "data must be one of"),
    ("constraints:cifar-without-data-dir", f"{_R.format('constraints')} --data cifar10", "needs data_dir"),
    ("smear:unknown-method", f"{_R.format('smear')} --methods nope", "unknown methods ['nope']"),
    ("smear:seeds-not-ints", f"{_R.format('smear')} --seeds x", "--seeds must be comma-separated integers"),
    ("smear:epochs-0", f"{_R.format('smear')} --epochs 0", "--epochs must be >= 1, got 0"),
    ("smear:patience-negative", f"{_R.format('smear')} --patience -1", "--patience must be >= 1, got -1"),
    ("smear:pretrain-epochs-negative", f"{_R.format('smear')} --pretrain-epochs -1", "--pretrain-epochs must be >= 1, got -1"),
    ("smear:threads-0", f"{_R.format('smear')} --threads 0", "--threads must be >= 1, got 0"),
    ("smear:lr-inf", f"{_R.format('smear')} --lr inf", "--lr must be a finite number, got 'inf'"),
    ("smear:num-train-0", f"{_R.format('smear')} --num-train 0", "--num-train must be >= 1, got 0"),
    ("comet:unknown-gate", f"{_R.format('comet')} --gates nope", "unknown gates/datasets ['nope']"),
    ("comet:trials-0", f"{_R.format('comet')} --trials 0", "--trials must be >= 1, got 0"),
    ("comet:plus-gamma-nan", f"{_R.format('comet')} --plus-gamma nan", "--plus-gamma must be a finite number"),
    ("comet:idx-data-without-idx-dir", f"{_R.format('comet')} --datasets multimnist", "needs idx_dir"),
    ("comet:missing-idx-dir", f"{_R.format('comet')} --datasets multimnist --idx-dir {{I}}/nope", "'{I}/nope"),
    ("mcsmoe:train-steps-0", f"{_R.format('mcsmoe')} --train-steps 0", "--train-steps must be >= 1, got 0"),
    ("mcsmoe:recovery-steps-negative", f"{_R.format('mcsmoe')} --recovery-steps -1", "--recovery-steps must be >= 1, got -1"),
    ("mcsmoe:unknown-variant", f"{_R.format('mcsmoe')} --variants msmoe,nope", "unknown variants ['nope']"),
    ("mcsmoe:bad-anchor", f"{_R.format('mcsmoe')} --anchor last", "anchor must be 'first', 'dominant' or an expert id"),
    ("mcsmoe:too-many-experts", f"{_R.format('mcsmoe')} --experts 9", "experts must be <= num_experts=8, got 9"),
    ("reproduce:unknown-experiment", "reproduce nope --out {O}", "argument EXPERIMENT: invalid choice: 'nope'"),
    ("moekit:unknown-command", "nope", "argument COMMAND: invalid choice: 'nope'"),
]})  # fmt: skip
FAULTS.update({case: Fault(argv, match, prog=DISTRIBUTED) for case, argv, match in [
    # the expert-parallel trainer (python -m moekit.distributed.train), run here on one process
    ("distributed:save-user-dir", "--steps 1 --quiet --save {I}/hf", "--save '{I}/hf' already exists and is not empty"),
    ("distributed:save-in-proc", "--steps 1 --quiet --save /proc/moekit-t", "--save '/proc/moekit-t' cannot be written"),
    ("distributed:out-in-proc", "--steps 1 --quiet --out /proc/moekit-t.json", "--out '/proc/moekit-t.json' cannot be"),
    ("distributed:steps-0", "--steps 0 --quiet", "argument --steps: must be >= 1, got 0"),
    ("distributed:lr-nan", "--lr nan --quiet", "argument --lr: must be a finite number > 0, got nan"),
    ("distributed:capacity-inf", "--capacity-factor inf --quiet", "argument --capacity-factor: must be a finite number"),
]})  # fmt: skip


def _tree(path: Path) -> dict[str, str] | str | None:
    if path.is_symlink():
        return f"link -> {path.readlink()}"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return _digest(path) if path.is_dir() else None


@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_gives_one_line_error_and_changes_nothing(case: str, inputs: Path, tmp_path: Path, capfd) -> None:
    fault = FAULTS[case]
    fault_name = case.split(":", 1)[1]
    out = _prepare_out(fault_name, tmp_path) if fault_name in OUT_FAULTS else tmp_path / "out"
    fill = lambda s: s.replace("{I}", str(inputs)).replace("{O}", str(out))  # noqa: E731
    argv = [fill(a) for a in shlex.split(fault.argv)]
    before_inputs, before_out, before_tmp = _digest(inputs), _tree(out), sorted(p.name for p in tmp_path.iterdir())
    capfd.readouterr()
    code = distributed_main(argv) if case.startswith("distributed:") else main(argv)
    err = capfd.readouterr().err
    command = " ".join(argv[:2]) if argv[0] == "reproduce" and not argv[1].startswith("-") else argv[0]
    command = {"reproduce:unknown-experiment": "reproduce", "moekit:unknown-command": "",
               "demo:unknown-option": ""}.get(case, command)  # fmt: skip
    prefix = (fault.prog or " ".join(filter(None, ("moekit", command)))) + ": error: "
    assert code == 2, f"{case}: exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(prefix), f"{case}: stderr:\n{err}"
    assert fill(fault.match) in err, f"{case}: {fill(fault.match)!r} not in {err!r}"
    assert _digest(inputs) == before_inputs, f"{case}: an input changed"
    assert _tree(out) == before_out, f"{case}: --out changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp, f"{case}: debris beside --out"
    assert not [p for p in inputs.iterdir() if p.name.startswith(".")], f"{case}: debris among the inputs"


def test_the_table_covers_every_command() -> None:
    from moekit.cli.main import build_parser

    parser = build_parser()
    commands = {a for a in parser._subparsers._group_actions[0].choices}  # noqa: SLF001
    reproduce = parser._subparsers._group_actions[0].choices["reproduce"]  # noqa: SLF001
    experiments = set(reproduce._subparsers._group_actions[0].choices)  # noqa: SLF001
    words = [argv.split() for argv in COMMANDS.values()]
    covered = {w[0] for w in words} | {w[1] for w in words if w[0] == "reproduce"}
    assert commands - {"reproduce"} <= covered and experiments <= covered
