"""Every saver SIGKILLed at random points while it saves.

The savers: ``save_checkpoint``, ``save_distributed_checkpoint`` (the expert-parallel format),
``moekit merge`` (checkpoint + report), ``compress_checkpoint`` (streamed, resumable) and ``moekit
report`` (a report directory). Each save runs in a forked child process that counts the lines of
moekit's code it executes (``sys.settrace``, from the saver's trigger on) and SIGKILLs itself at line
``n``, ``n`` drawn at random (seeded) up to the line count of a whole save; half of the kills fall
while an earlier output of moekit is being replaced (``overwrite``). After each kill:

* the output either does not exist or is complete: it loads and has every file its marker lists (a
  replaced output is still there, old or new, or waits in a set-aside directory the next run restores);
* the inputs are byte-identical (sha256 of every file);
* the next run into the same place succeeds (``--resume`` for the resumable compression, whose
  partial run directory is its documented state) and leaves no staging or set-aside debris.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

import moekit
from moekit.cli.main import main
from moekit.distributed.checkpoint import save_distributed_checkpoint
from moekit.distributed.model import ep_moe_classifier
from moekit.merging.pipeline import CompressionSpec
from moekit.merging.resume import RunDirectory
from moekit.merging.streaming import compress_checkpoint
from moekit.reporting import MARKER_NAME, atomic_directory, read_marker

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SRC = str(Path(moekit.__file__).resolve().parent)
ROOT = Path(__file__).resolve().parents[1]
LM_CONFIG = dict(dim=16, depth=2, heads=2, num_experts=4, k=2, hidden=24, max_seq_len=32)
EP_CONFIG = dict(in_dim=8, num_classes=3, dim=8, depth=1, num_experts=4)
BATCHES = [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]
SPEC = CompressionSpec(experts=2, budget="uniform", form="plain", propagate="original")


def _tracer(kill_at: int | None, trigger: CodeType | None, count: list[int]) -> Callable:
    """A ``sys.settrace`` function counting executed lines of moekit's code once ``trigger`` has been
    entered (at once when None); at line ``kill_at`` the process SIGKILLs itself."""
    active = [trigger is None]

    def local(frame, event, arg):  # noqa: ANN001
        if event == "line" and active[0]:
            count[0] += 1
            if kill_at is not None and count[0] >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def on_call(frame, event, arg):  # noqa: ANN001
        if frame.f_code is trigger:
            active[0] = True
        return local if frame.f_code.co_filename.startswith(SRC) else None

    return on_call


def _count_lines(save: Callable[[], object], trigger: CodeType | None) -> int:
    count = [0]
    sys.settrace(_tracer(None, trigger, count))
    try:
        save()
    finally:
        sys.settrace(None)
    return count[0]


def _run_killed(save: Callable[[], object], trigger: CodeType | None, kill_at: int) -> str:
    """Run ``save`` in a forked child killed at its ``kill_at``-th traced line: ``"killed"`` or ``"finished"``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            sys.settrace(_tracer(kill_at, trigger, [0]))
            save()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the saver hung (kill point {kill_at})")
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    assert os.WEXITSTATUS(status) == 0, f"the saver failed (exit {os.WEXITSTATUS(status)}) before kill point {kill_at}"
    return "finished"


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _check_marked(out: Path) -> None:
    """``out`` is a published moekit output: its marker lists its files, and they are all there."""
    marker = read_marker(out)
    assert marker is not None and "files" in marker, f"{out} has no sealed marker"
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MARKER_NAME)
    assert present == sorted(marker["files"]), f"{out}: files {present} but the marker lists {marker['files']}"


def _same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@dataclass(frozen=True)
class Saver:
    """``save(inputs, out, overwrite, resume)`` writes the output; ``check(inputs, out)`` asserts it is
    complete; ``trigger``: the function from whose entry lines are counted (None: the whole call)."""

    save: Callable[[Path, Path, bool, bool], object]
    check: Callable[[Path, Path], None]
    trigger: CodeType | None = None
    kills: int = 6


def _lm(inputs: Path) -> moekit.MoELM:
    return moekit.load_checkpoint(inputs / "lm")


def _save_checkpoint(inputs: Path, out: Path, overwrite: bool, resume: bool) -> None:
    moekit.save_checkpoint(_lm(inputs), out, overwrite=overwrite)


def _check_checkpoint(inputs: Path, out: Path) -> None:
    _check_marked(out)
    _same_state(moekit.load_checkpoint(out), load_file(str(inputs / "lm" / "model.safetensors")))


def _ep_model(inputs: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return ep_moe_classifier(**EP_CONFIG)


def _save_distributed(inputs: Path, out: Path, overwrite: bool, resume: bool) -> None:
    save_distributed_checkpoint(_ep_model(inputs), out, None, name="ep_moe_classifier", config=EP_CONFIG,
                                overwrite=overwrite, inputs=[inputs])  # fmt: skip


def _check_distributed(inputs: Path, out: Path) -> None:
    _check_marked(out)
    _same_state(moekit.load_checkpoint(out), _ep_model(inputs).state_dict())


def _merge(inputs: Path, out: Path, overwrite: bool, resume: bool) -> None:
    argv = ["merge", str(inputs / "lm"), "--experts", "2", "--calib", str(inputs / "calib.txt"), "--calib-samples",
            "4", "--seq-len", "16", "--out", str(out), "--quiet", *(["--overwrite"] if overwrite else [])]  # fmt: skip
    assert main(argv) == 0


def _check_merge(inputs: Path, out: Path) -> None:
    _check_marked(out)
    merged = moekit.load_checkpoint(out)
    assert all(layer.num_experts == 2 for layer in merged.modules() if isinstance(layer, moekit.MoE))
    assert json.loads((out / "merge_report.json").read_text())["input"] == str(inputs / "lm")


def _compress(inputs: Path, out: Path, overwrite: bool, resume: bool) -> None:
    compress_checkpoint(inputs / "lm", out, BATCHES, SPEC, overwrite=overwrite, resume=resume, quiet=True)


def _check_compress(inputs: Path, out: Path) -> None:
    _check_marked(out)
    compressed = moekit.load_checkpoint(out)
    assert sum(isinstance(m, moekit.MoE) for m in compressed.modules()) == LM_CONFIG["depth"]
    assert json.loads((out / "compress_report.json").read_text())["verification"]["max_abs_logit_diff"] <= 1e-5


def _report(inputs: Path, out: Path, overwrite: bool, resume: bool) -> None:
    argv = ["report", str(inputs / "results.json"), "--out", str(out), "--quiet", *(["--overwrite"] if overwrite else [])]
    assert main(argv) == 0


def _check_report(inputs: Path, out: Path) -> None:
    _check_marked(out)
    assert (out / "report.md").read_text().startswith("# ")
    assert json.loads((out / "results.json").read_text()) == json.loads((inputs / "results.json").read_text())
    assert (out / "utilisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_ATOMIC = atomic_directory.__wrapped__.__code__  # type: ignore[attr-defined]
SAVERS = {
    "save_checkpoint": Saver(_save_checkpoint, _check_checkpoint),
    "save_distributed_checkpoint": Saver(_save_distributed, _check_distributed),
    "moekit-merge": Saver(_merge, _check_merge, trigger=_ATOMIC),
    "compress_checkpoint": Saver(_compress, _check_compress, kills=4),
    "compress_checkpoint-publishing": Saver(_compress, _check_compress, trigger=RunDirectory.publish.__code__, kills=4),
    "moekit-report": Saver(_report, _check_report, trigger=_ATOMIC, kills=4),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    moekit.save_checkpoint(moekit.MoELM(**LM_CONFIG), root / "lm")
    (root / "calib.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    results = json.loads((ROOT / "docs" / "results" / "demo.json").read_text())
    label = results["runs"][0]["label"]  # one configuration, two seeds: a small report with every part
    results["runs"] = [r for r in results["runs"] if r["label"] == label][:2]
    results["configurations"] = [c for c in results["configurations"] if c.get("label") == label] or \
        results["configurations"][:1]
    (root / "results.json").write_text(json.dumps(results))
    return root


def _debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("name", list(SAVERS))
def test_saver_killed_at_random_points(name: str, inputs: Path, tmp_path: Path) -> None:
    saver = SAVERS[name]
    before = _digest(inputs)
    out = tmp_path / "out"
    lines = {ow: _count_lines(lambda: saver.save(inputs, out, ow, False), saver.trigger) for ow in (False, True)}
    saver.check(inputs, out)  # the counting runs wrote a complete output (the second one replaced the first)
    rng = random.Random(name)
    outcomes = []
    for i in range(saver.kills):
        overwrite = i % 2 == 1
        if not overwrite:
            shutil.rmtree(out)  # the test's own cleanup: a fresh save into a missing directory
        kill_at = rng.randint(1, lines[overwrite])
        outcomes.append(_run_killed(lambda: saver.save(inputs, out, overwrite, False), saver.trigger, kill_at))
        case = f"{name}: kill at line {kill_at}/{lines[overwrite]} ({'overwrite' if overwrite else 'fresh'})"
        if out.exists():
            saver.check(inputs, out)
        else:
            set_aside = [p for p in tmp_path.glob(".out.*.old") if (p / "previous").is_dir()]
            assert not overwrite or set_aside, f"{case}: the earlier output is gone"
        assert _digest(inputs) == before, f"{case}: an input changed"
        partial = (tmp_path / ".out.partial").exists()
        saver.save(inputs, out, overwrite or out.exists(), partial)  # the next run: the same command
        saver.check(inputs, out)
        assert _debris(tmp_path) == [], f"{case}: the next run left {_debris(tmp_path)}"
    assert "killed" in outcomes, f"{name}: no kill landed ({outcomes})"
