"""``training.training_steps``, the one training loop: the hooks run in their documented order with the
gradients they promise, and the loop computes what a plain zero_grad/backward/step loop computes."""

from __future__ import annotations

import torch
from torch import nn

from moekit.training import training_steps


def _setup(seed: int = 0) -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(5)]
    return model, batches


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def test_matches_a_plain_loop() -> None:
    model, batches = _setup()
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=0.1), torch.optim.Adam(reference.parameters(), lr=0.1)
    got = [float(loss.detach()) for _, loss, _ in training_steps(batches, lambda b: (_loss(model, b), {}), opt)]
    want = []
    for batch in batches:  # the naive reference
        ref_opt.zero_grad(set_to_none=True)
        loss = _loss(reference, batch)
        loss.backward()
        ref_opt.step()
        want.append(float(loss.detach()))
    assert got == want
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_hooks_run_in_order_with_this_steps_gradients() -> None:
    model, batches = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    events: list[tuple[str, int]] = []
    before: dict[str, torch.Tensor] = {}

    def step_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        events.append(("loss", len(events)))
        before["weight"] = model.weight.detach().clone()
        loss = _loss(model, batch)
        return loss, {"double": 2 * loss.detach()}

    def after_backward(step: int) -> None:
        events.append(("after_backward", step))
        (want,) = torch.autograd.grad(_loss(model, batches[step]), model.weight)
        assert torch.allclose(model.weight.grad, want)  # this batch's gradient alone, not accumulated
        before["grad"] = model.weight.grad.clone()

    def after_step(step: int) -> None:
        events.append(("after_step", step))
        assert model.weight.grad is not None  # gradients still present (a pruner reads them)
        assert torch.allclose(model.weight, before["weight"] - 0.5 * before["grad"])

    steps = []
    for step, loss, terms in training_steps(batches[:3], step_loss, opt, before_step=lambda s: events.append(("before", s)),
                                            after_backward=after_backward, after_step=after_step):  # fmt: skip
        assert torch.equal(terms["double"], 2 * loss.detach())
        steps.append(step)
    assert steps == [0, 1, 2]
    assert [e[0] for e in events] == ["before", "loss", "after_backward", "after_step"] * 3
    assert [s for name, s in events if name != "loss"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_runs_only_as_far_as_it_is_consumed() -> None:
    model, batches = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    loop = training_steps(batches, lambda b: (calls.append(1) or _loss(model, b), {}), opt)
    assert calls == []
    next(loop), next(loop)
    assert len(calls) == 2
