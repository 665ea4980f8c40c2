"""Hard constraints (relative / mean importance masking) and the soft constraints' values on small
hand-computed inputs (Pavlitska et al., arXiv:2204.10598)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import (
    AuxFreeBias,
    MeanImportanceConstraint,
    RelativeImportanceConstraint,
    RoutingDecision,
    TopKRouter,
    create_balancer,
    get_loss,
)
from moekit.balancing import ImportanceConstraint

# three tokens, four experts, top-2 post-softmax weights (rows sum to one)
IDS = torch.tensor([[0, 1], [1, 2], [0, 3]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
IMPORTANCE = [1.1, 1.1, 0.3, 0.5]  # column sums of the gates


def decision(ids: torch.Tensor = IDS, weights: torch.Tensor = WEIGHTS, E: int = 4) -> RoutingDecision:
    return RoutingDecision(
        ids_TK=ids,
        weights_TK=weights,
        num_experts=E,
        logits_TE=torch.zeros(ids.shape[0], E),
        probs_TE=torch.full((ids.shape[0], E), 1.0 / E),
    )


def test_relative_importance_statistic_and_mask_by_hand() -> None:
    c = RelativeImportanceConstraint(4, k=2, tau=0.3).train()
    c.observe(decision())
    uniform = 3 / 4
    expected = [(i - uniform) / uniform for i in IMPORTANCE]  # [0.4667, 0.4667, -0.6, -0.3333]
    torch.testing.assert_close(c.deviation, torch.tensor(expected))
    assert c.masked_experts().tolist() == [True, True, False, False]
    c.observe(decision())  # cumulative, never reset
    torch.testing.assert_close(c.deviation, 2 * torch.tensor(expected))
    logits = torch.randn(5, 4)
    masked = c.selection_logits(logits)
    assert torch.isinf(masked[:, :2]).all() and (masked[:, :2] < 0).all()
    torch.testing.assert_close(masked[:, 2:], logits[:, 2:])


def test_mean_importance_running_mean_by_hand() -> None:
    c = MeanImportanceConstraint(4, k=2, tau=0.07).train()
    c.observe(decision())
    other = decision(torch.tensor([[2, 3], [2, 3], [2, 3]]), torch.full((3, 2), 0.5))  # importance [0, 0, 1.5, 1.5]
    c.observe(other)
    mean_share = [(a / 3 + b / 3) / 2 for a, b in zip(IMPORTANCE, [0, 0, 1.5, 1.5])]  # [0.1833, 0.1833, 0.3, 0.3333]
    torch.testing.assert_close(c.mean_share, torch.tensor(mean_share))
    assert int(c.steps) == 2
    over = [s - 0.25 > 0.07 for s in mean_share]
    assert c.masked_experts().tolist() == over == [False, False, False, True]


def test_masks_only_in_training() -> None:
    c = RelativeImportanceConstraint(4, k=2, tau=0.3)
    c.observe(decision())
    logits = torch.randn(3, 4)
    assert torch.equal(c.eval().selection_logits(logits), logits)
    assert torch.isinf(c.train().selection_logits(logits)).any()


def test_router_never_picks_masked_experts_and_observes_only_in_training() -> None:
    c = MeanImportanceConstraint(6, k=2, tau=0.05)
    with torch.no_grad():
        c.mean_share.copy_(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05, 0.0]))
        c.steps.fill_(10)
    router = TopKRouter(8, 6, 2, noisy=False, balancer=c)
    x = torch.randn(32, 8)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 5.0  # experts 0 and 1 would win without the mask
        router.gate.weight[1] = 4.0
    masked = c.masked_experts()
    assert masked.tolist() == [True, True, False, False, False, False]
    d = router.train()(x)
    assert not torch.isin(d.ids_TK, torch.tensor([0, 1])).any()
    assert (d.gates_TE()[:, :2] == 0).all()
    steps = int(c.steps)
    d_eval = router.eval()(x)
    assert torch.isin(d_eval.ids_TK, torch.tensor([0, 1])).any()  # no mask in eval
    assert int(c.steps) == steps  # and no observation


def test_guard_keeps_k_experts_and_masks_the_most_over_used() -> None:
    c = RelativeImportanceConstraint(5, k=2, tau=0.1)
    with torch.no_grad():
        c.deviation.copy_(torch.tensor([0.9, 0.2, 0.5, 0.3, 0.15]))  # all five exceed tau
    assert c.masked_experts().tolist() == [True, False, True, True, False]  # the E-k=3 largest
    router = TopKRouter(4, 5, 2, noisy=False, balancer=c).train()
    d = router(torch.randn(16, 4))
    assert set(d.ids_TK.unique().tolist()) <= {1, 4}
    assert torch.isfinite(d.weights_TK).all()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8).flatmap(
        lambda E: st.tuples(
            st.just(E),
            st.integers(1, E),
            st.lists(st.floats(-2, 2, allow_nan=False), min_size=E, max_size=E),
            st.floats(0.01, 1.0),
        )
    )
)
def test_guard_property(args: tuple) -> None:
    E, k, stats, tau = args
    c = RelativeImportanceConstraint(E, k=k, tau=tau)
    with torch.no_grad():
        c.deviation.copy_(torch.tensor(stats))
    mask = c.masked_experts()
    score = torch.tensor(stats)
    assert int(mask.sum()) <= E - k
    assert (score[mask] > tau).all()
    over = score > tau
    if int(over.sum()) <= E - k:
        assert torch.equal(mask, over)
    elif int(mask.sum()) and int((~mask & over).sum()):
        assert score[mask].min() >= score[~mask & over].max()
    logits = torch.randn(3, E)
    chosen = c.train().selection_logits(logits).topk(k).indices
    assert not mask[chosen].any()


@pytest.mark.parametrize("cls", [RelativeImportanceConstraint, MeanImportanceConstraint])
def test_bad_arguments(cls: type[ImportanceConstraint]) -> None:
    for tau in (0.0, -0.5):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            cls(4, k=2, tau=tau)
    with pytest.raises(ValueError, match="k must be <= 4"):
        cls(4, k=5, tau=0.3)
    with pytest.raises(ValueError, match="balancer must be one of"):
        create_balancer("nope", 4, k=2)


def test_create_balancer_by_name() -> None:
    assert isinstance(create_balancer("relative", 4, k=2, tau=0.5), RelativeImportanceConstraint)
    assert isinstance(create_balancer("mean", 4, k=2), MeanImportanceConstraint)
    assert isinstance(create_balancer("aux_free", 4, k=2, rate=0.1), AuxFreeBias)


def test_state_lives_in_buffers() -> None:
    c = MeanImportanceConstraint(4, k=2)
    c.observe(decision())
    fresh = MeanImportanceConstraint(4, k=2)
    fresh.load_state_dict(c.state_dict())
    torch.testing.assert_close(fresh.mean_share, c.mean_share)
    assert int(fresh.steps) == 1


# ----- soft constraints: hand-computed values -----------------------------------------------------


def test_importance_cv2_by_hand() -> None:
    mean = sum(IMPORTANCE) / 4
    var = sum((i - mean) ** 2 for i in IMPORTANCE) / 4  # population variance
    assert float(get_loss("importance")(decision())) == pytest.approx(var / mean**2, rel=1e-5)  # 0.22667


def test_kl_to_uniform_by_hand() -> None:
    p = [i / 3 for i in IMPORTANCE]
    expected = sum(q * math.log(q / 0.25) for q in p)
    assert float(get_loss("kl_uniform")(decision())) == pytest.approx(expected, rel=1e-5)


def test_other_losses_by_hand() -> None:
    d = RoutingDecision(
        ids_TK=torch.tensor([[0], [0], [1]]),
        weights_TK=torch.ones(3, 1),
        num_experts=2,
        logits_TE=torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]),
        probs_TE=torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]),
    )
    # switch: E * sum_e f_e P_e with f = [2/3, 1/3], P = [0.5, 0.5]
    assert float(get_loss("switch")(d)) == pytest.approx(2 * (2 / 3 * 0.5 + 1 / 3 * 0.5))
    z = [math.log(math.exp(1) + 1), math.log(math.exp(2) + 1), math.log(2)]
    assert float(get_loss("z")(d)) == pytest.approx(sum(v * v for v in z) / 3, rel=1e-5)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert float(get_loss("entropy")(d)) == pytest.approx((h(0.75) + h(0.5) + h(0.25)) / 3, rel=1e-5)
    assert float(get_loss("load")(d)) == pytest.approx(((2 - 1.5) ** 2 + (1 - 1.5) ** 2) / 2 / 1.5**2, rel=1e-5)
