"""Multi-gate multi-task MoE: shapes, per-task losses and metrics, sparse == dense, checkpoint, errors."""

import pytest
import torch

import moekit
from moekit.checkpoint import load_checkpoint, save_checkpoint
from moekit.data.synthetic_multitask import make_synthetic_multitask
from moekit.models.multitask import MultiGateMoE, TaskSpec

TASKS = [TaskSpec("digit", "classification", 4), TaskSpec("value", "regression", 1)]


def test_forward_gives_one_output_and_gate_per_task() -> None:
    model = MultiGateMoE(10, TASKS, num_experts=6, router="comet", router_kwargs={"k": 2})
    out = model(torch.randn(7, 10))
    assert [o.shape for o in out.outputs] == [(7, 4), (7, 1)]
    assert len(out.moe) == 2 and all("entropy_reg" in m.aux for m in out.moe)
    targets = [torch.randint(0, 4, (7,)), torch.randn(7)]
    losses, metrics = model.task_losses(out, targets), model.task_metrics(out, targets)
    assert len(losses) == len(metrics) == 2 and 0.0 <= metrics[0] <= 1.0
    torch.testing.assert_close(losses[1].detach(), torch.tensor(metrics[1]))  # regression metric is the MSE


@pytest.mark.parametrize(
    "router,kwargs",
    [
        ("comet", {"k": 2, "gamma": 0.2}),
        ("dselect", {"k": 2, "conditioning": "task"}),
        ("topk", {"k": 2, "noisy": False}),
    ],
)
def test_sparse_equals_dense_combine(router: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    sparse = MultiGateMoE(10, TASKS, num_experts=6, router=router, router_kwargs=kwargs)
    dense = MultiGateMoE(10, TASKS, num_experts=6, router=router, router_kwargs=kwargs, combine="dense")
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(12, 10)
    for a, b in zip(sparse(x).outputs, dense(x).outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_task_gates_learn_on_synthetic_data() -> None:
    data = make_synthetic_multitask(600, dim=20, correlation=0.5, seed=0)
    model = MultiGateMoE(20, data.tasks, num_experts=4, router="dselect", router_kwargs={"k": 2})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.task_losses(model(data.x_val), data.ys_val)
    for idx in torch.randperm(data.x_train.shape[0]).split(32) * 3:
        loss = sum(model.task_losses(model(data.x_train[idx]), [y[idx] for y in data.ys_train]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.task_losses(model(data.x_val), data.ys_val)
    assert all(a < 0.8 * b for a, b in zip(after, before))


def test_checkpoint_round_trip(tmp_path) -> None:
    model = MultiGateMoE(10, TASKS, num_experts=4, router="dselect", router_kwargs={"k": 1, "gamma": 2.0})
    save_checkpoint(model, tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m")
    x = torch.randn(5, 10)
    for a, b in zip(model(x).outputs, loaded(x).outputs):
        torch.testing.assert_close(a, b)


def test_errors_name_the_mismatch() -> None:
    gates = [moekit.TopKRouter(10, 4, 2)]
    with pytest.raises(ValueError, match="got 1 gates for 2 tasks"):
        MultiGateMoE(10, TASKS, num_experts=4, gates=gates)
    with pytest.raises(ValueError, match=r"gates\[0\] has dim=10, num_experts=4"):
        MultiGateMoE(10, TASKS, num_experts=6, gates=gates * 2)
    model = MultiGateMoE(10, TASKS, num_experts=4)
    with pytest.raises(ValueError, match="got 1 targets for 2 tasks"):
        model.task_losses(model(torch.randn(3, 10)), [torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"input must be \[B, in_dim=10\]"):
        model(torch.randn(3, 9))
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskSpec("t", "ranking", 2)
    with pytest.raises(ValueError, match="built from ready-made gates"):
        MultiGateMoE(10, TASKS, num_experts=4, gates=[moekit.TopKRouter(10, 4, 2) for _ in TASKS]).config()
    with pytest.raises(ValueError, match="tasks must name at least one task"):
        MultiGateMoE(10, [], num_experts=4)
