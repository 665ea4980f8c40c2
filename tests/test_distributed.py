"""Expert parallelism on torch.distributed: two gloo processes on this machine vs one process.

The 2-rank runs live in ``_distributed_worker.py`` (launched as subprocesses with a file store, so no
port is needed); this file compares what they write with single-process computations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moekit
from moekit.distributed import load_distributed_model, load_distributed_state, read_distributed_config, save_distributed_checkpoint
from moekit.distributed.model import ep_moe_classifier
from moekit.distributed.train import EPTrainConfig, global_batches, train_expert_parallel

WORKER_PATH = Path(__file__).with_name("_distributed_worker.py")
_spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

WORLD = 2


def _launch(scenario: str, tmp: Path, *, timeout: float = 240.0) -> list[str]:
    """Run the scenario on WORLD ranks; returns each rank's output. Rank 0 decides the end: once it
    exits, stragglers (a rank told to hang) are killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER_PATH), scenario]
    procs = [
        subprocess.Popen([*cmd, str(r), str(WORLD), str(tmp / "store"), str(tmp)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    outputs = []
    try:
        outputs.append(procs[0].communicate(timeout=timeout)[0])
        for p in procs[1:]:
            if scenario != "main":
                p.kill()
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if scenario == "main":
        for rank, (p, text) in enumerate(zip(procs, outputs)):
            assert p.returncode == 0, f"rank {rank} failed:\n{text}"
    return outputs


@pytest.fixture(scope="module")
def main_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ep_main")
    _launch("main", tmp)
    return tmp


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(worker.CASES))
def test_ep_layer_matches_single_process(main_run: Path, case: str) -> None:
    """Outputs, input gradients, router and expert gradients and balancer state of the 2-rank layer
    equal those of moekit.MoE on the global batch (per rank's slice where capacity is per rank)."""
    ranks = [load_file(str(main_run / f"layer-{case}-rank{r}.safetensors")) for r in range(WORLD)]
    moe = worker.build_case(case)
    _, _, per_rank, forwards = worker.CASES[case]
    x, g, meta = worker.case_inputs(case)
    x = x.clone().requires_grad_()
    chunks = list(range(WORLD)) if per_rank else [None]
    ys = []
    for c in chunks:
        sl = slice(None) if c is None else slice(c * len(x) // WORLD, (c + 1) * len(x) // WORLD)
        m = None if meta is None else {k: v[sl] for k, v in meta.items()}
        for _ in range(forwards):
            y = moe(x[sl], meta=m).y
        ys.append(y)
    y = torch.cat(ys)
    (y * g).sum().backward()
    _close(torch.cat([r["y"] for r in ranks]), y.detach(), "y")
    _close(torch.cat([r["x_grad"] for r in ranks]), x.grad, "input gradient")
    for name, p in moe.router.named_parameters():
        _close(sum(r[f"grad.router.{name}"] for r in ranks), p.grad, f"router gradient {name}")
    for name, p in moe.experts.named_parameters():
        _close(torch.cat([r[f"grad.experts.{name}"] for r in ranks]), p.grad, f"expert gradient {name}")
    for name, b in moe.named_buffers():
        for r in ranks:
            _close(r[f"buffer.{name}"], b, f"buffer {name}")
    if case == "glu_aux_free":
        assert moe.router.balancer.bias.abs().sum() > 0  # the global statistics actually moved the bias


def test_ep_training_matches_single_process(main_run: Path) -> None:
    """SGD steps with 2 ranks (ep=2, and ep=1 x dp=2) give the single-process losses: DDP for dense
    parameters, expert gradients scaled by sync_expert_grads, aux-free bias from global counts."""
    single = train_expert_parallel(worker.TRAIN, None, quiet=True)
    runs = json.loads((main_run / "training.json").read_text())
    for layout, run in runs.items():
        assert run["losses"] == pytest.approx(single.losses, rel=1e-4, abs=1e-5), layout
        assert run["accuracy"] == pytest.approx(single.accuracy, abs=1e-9), layout
    assert single.losses[-1] < single.losses[0]


def test_checkpoint_saved_on_two_ranks_loads_on_one(main_run: Path) -> None:
    """Saved with ep=2; reloaded on one process and re-sharded onto 2 ranks with ep=1: same logits."""
    meta = read_distributed_config(main_run / "ckpt")
    assert meta["ep_size"] == 2 and sorted(p.name for p in (main_run / "ckpt").iterdir()) == [
        ".moekit-output.json", "config.json", "dense.safetensors", "experts-00000-of-00002.safetensors",
        "experts-00001-of-00002.safetensors"]
    model = moekit.load_checkpoint(main_run / "ckpt").eval()  # the same entry point as every checkpoint
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(x)
    saved = [load_file(str(main_run / f"ckpt-logits-rank{r}.safetensors")) for r in range(WORLD)]
    _close(torch.cat([s["saved"] for s in saved]), logits, "logits after reload on one process")
    _close(torch.cat([s["resharded"] for s in saved]), logits, "logits after reload on 2 ranks with ep=1")
    wrong = ep_moe_classifier(**{**worker.TRAIN.model_config(64, 10), "num_experts": 8})
    with pytest.raises(ValueError, match="num_experts=4 in the checkpoint but 8"):
        load_distributed_state(wrong, main_run / "ckpt")


def test_bad_layouts_and_mismatched_configs_raise_clear_errors(main_run: Path) -> None:
    for rank in range(WORLD):
        messages = json.loads((main_run / f"errors-rank{rank}.json").read_text())
        assert "ep_size=3 must divide the world size 2" in messages["bad_ep_size"]
        assert "num_experts=3" in messages["indivisible"] and "ep_size=2" in messages["indivisible"]
        assert "mismatched ExpertParallelMoE configs" in messages["mismatch"]
        assert "hidden=16" in messages["mismatch"] and "hidden=32" in messages["mismatch"]


def test_failed_rank_gives_clear_error_within_timeout(tmp_path: Path) -> None:
    """A hung rank (3 s group timeout) and then a killed rank (connection reset) make the other rank
    raise ExpertParallelError instead of waiting forever."""
    outputs = _launch("failures", tmp_path, timeout=90)
    report_path = tmp_path / "failures.json"
    assert report_path.is_file(), f"rank 0 wrote no report:\n{outputs[0]}"
    report = json.loads(report_path.read_text())
    for how, timeout in (("stuck", 3), ("dead", 30)):
        assert report[how]["type"] == "ExpertParallelError", how
        assert "all_to_all of token counts failed on rank 0 in the group of ranks [0, 1]" in report[how]["error"]
        assert f"process-group timeout {timeout}s" in report[how]["error"]
    assert 2.5 < report["stuck"]["seconds"] < 3.0 + 5.0
    assert report["dead"]["seconds"] < 10.0  # detected from the closed connection, not the 30 s timeout


@pytest.mark.parametrize("point", worker.SETUP_POINTS)
def test_rank_killed_during_setup_gives_expert_parallel_error(tmp_path: Path, point: str) -> None:
    """A rank SIGKILLed before joining, before the groups connect, or before DDP's parameter broadcast
    makes the other rank raise ExpertParallelError naming the set-up step, within the 3 s timeout, not gloo's default 30 min (not
    gloo's raw "Connection closed by peer" / the store's "Wait timeout")."""
    outputs = _launch(f"setup-{point}", tmp_path, timeout=90)
    report_path = tmp_path / "setup.json"
    assert report_path.is_file(), f"rank 0 wrote no report:\n{outputs[0]}"
    report = json.loads(report_path.read_text())
    step = {"init": "init_process_group failed on rank 0 during the process-group set-up",
            "groups": "new_group of ranks [0, 1] failed on rank 0 during the process-group set-up",
            "ddp": "DistributedDataParallel set-up (parameter check and broadcast) failed on rank 0 in the group"}
    assert report["type"] == "ExpertParallelError", report
    assert step[point] in report["error"] and "a peer rank probably died" in report["error"], report["error"]
    assert "process-group timeout 3s" in report["error"]
    # far below gloo's default 30 min timeout, with room for a loaded machine (16 s seen at load 9 on 2 cores)
    assert report["seconds"] < 3.0 + 60.0


def test_single_process_checkpoint_round_trip_and_atomicity(tmp_path: Path) -> None:
    config = worker.TRAIN.model_config(64, 10)
    torch.manual_seed(0)
    model = ep_moe_classifier(**config)
    save_distributed_checkpoint(model, tmp_path / "ck", name="ep_moe_classifier", config=config)
    reloaded = load_distributed_model(tmp_path / "ck")
    for (k, a), (k2, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(FileExistsError, match="already exists"):
        save_distributed_checkpoint(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="not an expert-parallel moekit checkpoint"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text('{"format": "moekit"}')
        read_distributed_config(tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ck"]  # no temporary directories left


def test_trainer_config_and_batches() -> None:
    with pytest.raises(ValueError, match="router must be one of"):
        EPTrainConfig(router="softmax")
    batches = list(global_batches(10, 4, 5, seed=0))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert sorted(torch.cat(batches[:2]).tolist()) == sorted(set(torch.cat(batches[:2]).tolist()))  # no repeat within an epoch
    with pytest.raises(ValueError, match="batch_size=20 exceeds"):
        list(global_batches(10, 20, 1, seed=0))
