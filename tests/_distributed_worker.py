"""One rank of the multi-process tests in test_distributed.py (not collected by pytest).

Usage: ``python _distributed_worker.py SCENARIO RANK WORLD STORE_FILE OUT_DIR``. Results go to OUT_DIR
as safetensors/JSON; test_distributed.py compares them with single-process runs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from moekit import (  # noqa: E402
    AuxFreeBias, ConvExperts, DSelectKRouter, ExpertChoiceRouter, GLUExperts, HashRouter, MLPExperts, MoE, SwitchRouter,
    TopKRouter, load_checkpoint, save_checkpoint,
)
from moekit.distributed import (  # noqa: E402
    ExpertParallelError, ExpertParallelMoE, expert_parallel, init_distributed, make_groups, wrap_ddp,
)
from moekit.distributed.model import ep_moe_classifier  # noqa: E402
from moekit.distributed.train import EPTrainConfig, train_expert_parallel  # noqa: E402

E, D, F, T = 4, 8, 16, 12  # experts, width, hidden, global tokens

#: name -> (router factory, bank factory, capacity applies per rank's slice, forwards before backward)
CASES = {
    "topk_dropless": (lambda: TopKRouter(D, E, k=2, noisy=False), lambda: MLPExperts(E, D, F), False, 1),
    "topk_capacity": (lambda: TopKRouter(D, E, k=2, noisy=False, capacity_factor=0.75), lambda: MLPExperts(E, D, F), True, 1),
    "switch": (lambda: SwitchRouter(D, E), lambda: MLPExperts(E, D, F, bias=False), True, 1),
    "glu_aux_free": (lambda: TopKRouter(D, E, k=1, noisy=False, balancer=AuxFreeBias(E, rate=0.5)),
                     lambda: GLUExperts(E, D, F), False, 3),
    "hash": (lambda: HashRouter(D, E, num_keys=50, k=2), lambda: MLPExperts(E, D, F), False, 1),
    "conv": (lambda: TopKRouter(3, E, k=1, noisy=False), lambda: ConvExperts(E, 3, 5, 3), False, 1),
    "expert_choice": (lambda: ExpertChoiceRouter(D, E, capacity_factor=1.0), lambda: MLPExperts(E, D, F), True, 1),
    "dselect": (lambda: DSelectKRouter(D, E, k=2), lambda: MLPExperts(E, D, F), False, 1),
}

TRAIN = EPTrainConfig(steps=6, batch_size=64, lr=0.05, optimizer="sgd", dim=32, depth=2, num_experts=4, k=2,
                      aux_free_rate=0.01, z_loss=1e-3, log_every=100)


def build_case(name: str) -> MoE:
    router, bank, _, _ = CASES[name]
    torch.manual_seed(0)
    return MoE(router(), bank())


def case_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """Global batch ``x``, upstream gradient ``g`` (loss = sum(y * g)) and meta."""
    gen = torch.Generator().manual_seed(1)
    if name == "conv":
        x = torch.randn(T, 3, 4, 4, generator=gen)
        return x, torch.randn(T, 5, 4, 4, generator=gen), None
    x = torch.randn(T, D, generator=gen)
    meta = {"token_ids": torch.randint(0, 50, (T,), generator=gen)} if name == "hash" else None
    return x, torch.randn(T, D, generator=gen), meta


def _layer_cases(rank: int, world: int, out: Path) -> None:
    groups = make_groups(timeout_s=60)
    for name in CASES:
        layer = ExpertParallelMoE.from_moe(build_case(name), groups)
        x, g, meta = case_inputs(name)
        sl = slice(rank * T // world, (rank + 1) * T // world)
        x_local = x[sl].clone().requires_grad_()
        meta_local = None if meta is None else {k: v[sl] for k, v in meta.items()}
        for _ in range(CASES[name][3]):
            result = layer(x_local, meta=meta_local)
        (result.y * g[sl]).sum().backward()
        tensors = {"y": result.y.detach(), "x_grad": x_local.grad}
        tensors.update({f"grad.{n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
        tensors.update({f"buffer.{n}": b for n, b in layer.named_buffers()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"layer-{name}-rank{rank}.safetensors"))


def _errors(rank: int, world: int, out: Path) -> dict[str, str]:
    groups = make_groups(timeout_s=60)
    messages = {}
    try:
        make_groups(3)
    except ValueError as err:
        messages["bad_ep_size"] = str(err)
    torch.manual_seed(0)
    try:
        ExpertParallelMoE.from_moe(MoE(TopKRouter(D, 3, k=1), MLPExperts(3, D, F)), groups)
    except ValueError as err:
        messages["indivisible"] = str(err)
    torch.manual_seed(0)
    hidden = F if rank == 0 else 2 * F  # rank 1 builds a different layer
    try:
        ExpertParallelMoE.from_moe(MoE(TopKRouter(D, E, k=2), MLPExperts(E, D, hidden)), groups)
    except ValueError as err:
        messages["mismatch"] = str(err)
    return messages


def _logits(model: torch.nn.Module, rank: int) -> torch.Tensor:
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        return model(x[rank * 5 : (rank + 1) * 5])[0]


def _training(rank: int, world: int, out: Path) -> None:
    results, logits = {}, {}
    for ep in (world, 1):  # ep=2 (experts sharded) and ep=1, dp=2 (experts replicated)
        groups = make_groups(ep, timeout_s=60)
        result = train_expert_parallel(TRAIN, groups, quiet=True)
        results[f"ep{ep}"] = {"losses": result.losses, "accuracy": result.accuracy}
        if ep == world:
            save_checkpoint(result.model, out / "ckpt", groups=groups, name="ep_moe_classifier",
                            config=TRAIN.model_config(64, 10))  # the one entry point: sharded on 2 ranks
            logits["saved"] = _logits(result.model, rank)
        else:  # re-shard the ep=2 checkpoint onto the ep=1 layout
            logits["resharded"] = _logits(load_checkpoint(out / "ckpt", groups=groups), rank)
    save_file(logits, str(out / f"ckpt-logits-rank{rank}.safetensors"))
    if rank == 0:
        (out / "training.json").write_text(json.dumps(results))


def _time_failure(layer: ExpertParallelMoE, x: torch.Tensor) -> dict:
    start = time.perf_counter()
    try:
        layer(x)
        report = {"error": None, "type": None}
    except ExpertParallelError as err:
        report = {"error": str(err), "type": type(err).__name__}
    return {**report, "seconds": time.perf_counter() - start}


def _failures(rank: int, world: int, out: Path) -> None:
    """Rank 1 first hangs past a 3 s timeout, then dies (SIGKILL); rank 0 must raise each time.

    Two sets of groups: a timed-out gloo group is unusable afterwards, and the second set's 30 s
    timeout covers the wait for rank 1 to come back from its hang."""
    stuck = ExpertParallelMoE.from_moe(build_case("topk_dropless"), make_groups(timeout_s=3))
    dead = ExpertParallelMoE.from_moe(build_case("topk_dropless"), make_groups(timeout_s=30))
    x = torch.randn(T // world, D)
    stuck(x), dead(x)  # good steps
    report = {}
    if rank == 1:
        time.sleep(6)
    else:
        report["stuck"] = _time_failure(stuck, x)
    dead(x)  # good step once rank 1 is back
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    report["dead"] = _time_failure(dead, x)
    (out / "failures.json").write_text(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)  # the groups are broken: skip the normal teardown


#: where ``setup-<point>`` kills rank 1 (SIGKILL), in the order of a training run's set-up
SETUP_POINTS = ("init", "groups", "ddp")


def _setup_killed(point: str, rank: int, world: int, store: str, out: Path) -> None:
    """Rank 1 dies at ``point`` of the set-up (before joining, before the groups, before DDP); rank 0
    records what it raised and how long it took (every timeout is 3 s)."""

    def maybe_die(here: str) -> None:
        if rank == 1 and here == point:
            os.kill(os.getpid(), signal.SIGKILL)

    start = time.perf_counter()
    try:
        maybe_die("init")
        init_distributed(backend="gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout_s=3)
        maybe_die("groups")
        groups = make_groups(timeout_s=3)
        torch.manual_seed(0)
        model = expert_parallel(ep_moe_classifier(in_dim=8, num_classes=3, dim=8, depth=1, num_experts=4), groups)
        maybe_die("ddp")
        wrap_ddp(model, groups)
        report = {"error": None, "type": None}
    except Exception as err:  # noqa: BLE001 - the test checks which type it is
        report = {"error": str(err), "type": type(err).__name__}
    (out / "setup.json").write_text(json.dumps({**report, "seconds": time.perf_counter() - start}))
    sys.stdout.flush()
    os._exit(0)  # the groups are broken: skip the normal teardown


def main() -> None:
    scenario, rank, world, store, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
    if scenario.startswith("setup-"):
        _setup_killed(scenario.removeprefix("setup-"), rank, world, store, out)
    init_distributed(backend="gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout_s=60)
    try:
        if scenario == "main":
            _layer_cases(rank, world, out)
            messages = _errors(rank, world, out)
            (out / f"errors-rank{rank}.json").write_text(json.dumps(messages))
            _training(rank, world, out)
        else:
            _failures(rank, world, out)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
