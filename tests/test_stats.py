"""Routing statistics on constructed routings whose metrics are known by hand."""

import math

import pytest
import torch
from torch import nn

import moekit
from moekit.routers.base import Router
from moekit.stats import LayerStats, routing_metrics
from moekit.types import RoutingDecision


class LabelRouter(Router):
    """Sends each token to expert ``tag`` (weight 0.75) and expert ``(tag + 1) % 4`` (weight 0.25)."""

    def __init__(self) -> None:
        super().__init__(4, 4, 2)

    def route(self, x, meta):
        t = meta["tag"].long()
        ids = torch.stack([t, (t + 1) % 4], 1)
        weights = torch.tensor([0.75, 0.25]).expand(len(t), 2)
        logits = torch.zeros(len(t), 4).scatter(1, ids, torch.tensor([2.0, 1.0]).expand(len(t), 2))
        return RoutingDecision(ids, weights, 4, logits_TE=logits, probs_TE=torch.softmax(logits, -1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = moekit.MoE(LabelRouter(), moekit.MLPExperts(4, 4, 8))

    def forward(self, batch):
        x, tags = batch
        return self.moe(x, meta={"tag": tags}).y


def test_recorder_metrics_on_a_known_routing() -> None:
    tags = torch.tensor([0, 0, 1, 2])  # slots: 0,1 | 0,1 | 1,2 | 2,3
    batches = [(torch.randn(4, 4), tags), (torch.randn(4, 4), tags)]  # two batches: everything doubles
    rec = moekit.record_routing(Net(), batches, forward=lambda m, b: m(b), labels=lambda b: b[1])
    m = rec.metrics()["moe.router"]
    counts = torch.tensor([2.0, 3, 2, 1]) * 2
    importance = torch.tensor([1.5, 0.75 + 0.5, 0.25 + 0.75, 0.25]) * 2
    assert m.tokens == 8
    assert m.tokens_per_expert.tolist() == counts.tolist()
    torch.testing.assert_close(m.importance, importance.double())
    assert m.living_experts == 4
    assert math.isclose(m.cv_counts, float(counts.std(correction=0) / counts.mean()), rel_tol=1e-6)
    assert math.isclose(m.cv_importance, float(importance.std(correction=0) / importance.mean()), rel_tol=1e-6)
    assert math.isclose(m.max_violation, 6 / 4 - 1)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 0.0]), -1)
    assert math.isclose(m.entropy, float(-(p * p.log()).sum()), rel_tol=1e-6)
    expected_coact = torch.tensor([[2, 2, 0, 0], [2, 3, 1, 0], [0, 1, 2, 1], [0, 0, 1, 1]], dtype=torch.float64) * 2
    assert torch.equal(m.coactivation, expected_coact)
    stats = rec.stats["moe.router"]
    assert stats.label_counts_LE.tolist() == [[4, 4, 0, 0], [0, 2, 2, 0], [0, 0, 2, 2]]
    torch.testing.assert_close(stats.label_gates_LE[0], torch.tensor([3.0, 1.0, 0, 0], dtype=torch.float64))
    assert m.as_dict()["tokens_per_expert"] == counts.tolist()


def test_dead_experts_and_dropped_slots() -> None:
    stats = LayerStats(4)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    kept = torch.tensor([[True, False], [True, True], [True, False]])
    stats.add(RoutingDecision(ids, torch.full((3, 2), 0.5), 4, kept_TK=kept), None, False, None)
    m = routing_metrics(stats)
    assert m.tokens_per_expert.tolist() == [3, 0, 1, 0]  # dropped slots are not served
    assert m.living_experts == 2
    assert m.importance.tolist() == [1.5, 0.0, 0.5, 0.0]
    assert math.isnan(m.entropy)  # the decision has no distribution
    assert m.coactivation[0, 1] == 0 and m.coactivation[0, 2] == 1


def test_empty_stats_give_nan_not_errors() -> None:
    m = routing_metrics(LayerStats(3))
    assert m.tokens == 0 and m.living_experts == 0
    assert math.isnan(m.cv_counts) and math.isnan(m.max_violation)


def test_recorder_keeps_logits_up_to_max_tokens_and_removes_hooks() -> None:
    model = nn.Sequential(moekit.MoE(moekit.TopKRouter(4, 3, 1), moekit.MLPExperts(3, 4, 8)))
    with moekit.RoutingRecorder(model, keep_logits=True, max_tokens=5) as rec:
        model[0](torch.randn(4, 4))
        model[0](torch.randn(4, 4))
    assert rec.stats["0.router"].logits_TE().shape == (5, 3)
    model[0](torch.randn(4, 4))
    assert rec.stats["0.router"].tokens == 8


def test_recorder_sources_for_foreign_routers_and_layer_filter() -> None:
    class Foreign(nn.Module):
        def forward(self, x):
            return x.argmax(-1, keepdim=True)

    foreign = Foreign()
    to_decision = lambda ids: RoutingDecision(ids, torch.ones(ids.shape), 3)  # noqa: E731
    model = nn.Sequential(moekit.MoE(moekit.TopKRouter(3, 3, 1), moekit.MLPExperts(3, 3, 4)))
    with moekit.RoutingRecorder(model, sources={"foreign": (foreign, to_decision)}, layers=["foreign"]) as rec:
        foreign(torch.eye(3)[[0, 2, 2]])
        model(torch.randn(2, 3))
    assert list(rec.stats) == ["foreign"]
    assert rec.metrics()["foreign"].tokens_per_expert.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="not found"):
        moekit.RoutingRecorder(model, layers=["nope"])


def test_record_routing_errors() -> None:
    with pytest.raises(ValueError, match="no routed layer"):
        moekit.record_routing(nn.Linear(3, 3), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="labels have 3 entries"):
        moekit.record_routing(Net(), [(torch.randn(4, 4), torch.tensor([0, 0, 1, 2]))],
                              forward=lambda m, b: m(b), labels=lambda b: torch.tensor([0, 1, 2]))


def test_living_and_used_experts_have_one_definition_each() -> None:
    """living = mean gate > 0.01 (the paper), used = at least one kept slot; analysis reports the same."""
    from moekit.analysis.collect import LayerRecord
    from moekit.analysis.metrics import analyze_layer

    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weights = torch.tensor([[0.995, 0.005], [0.6, 0.4], [0.99, 0.01]])  # expert 1: mean gate 0.005
    decision = RoutingDecision(ids, weights, 4)
    stats = LayerStats(4)
    stats.add(decision, None, False, None)
    m = routing_metrics(stats)
    assert m.used_experts == 3 and m.living_experts == 2
    assert m.as_dict()["used_experts"] == 3 and m.as_dict()["living_experts"] == 2
    record = LayerRecord("l", stats, decision.gates_TE(), ids, None, None)
    assert analyze_layer(record).living_experts == m.living_experts
