"""Routing statistics on constructed routings with known answers."""

import math

import torch
from torch import nn

import moekit
from moekit.routers.base import Router
from moekit.types import RoutingDecision


class LabelRouter(Router):
    """Sends each token to the expert named by meta['tag'] and also to expert (tag+1) % E."""

    def __init__(self):
        super().__init__(4, 4, 2)

    def route(self, x, meta):
        t = meta["tag"].long()
        ids = torch.stack([t, (t + 1) % 4], 1)
        return RoutingDecision(ids, torch.full(ids.shape, 0.5), 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = moekit.MoE(LabelRouter(), moekit.MLPExperts(4, 4, 8))

    def forward(self, batch):
        x, tags = batch
        return self.moe(x, meta={"tag": tags}).y


def test_recorder_counts_coactivation_and_labels() -> None:
    tags = torch.tensor([0, 0, 1, 2])
    rec = moekit.record_routing(
        Net(), [(torch.randn(4, 4), tags)], forward=lambda m, b: m(b), labels=lambda b: b[1]
    )
    m = rec.metrics()["moe.router"]
    assert m.tokens_per_expert.tolist() == [2, 3, 2, 1]
    assert m.living_experts == 4
    counts = torch.tensor([2.0, 3, 2, 1])
    assert math.isclose(m.cv_counts, float(counts.std(correction=0) / counts.mean()), rel_tol=1e-6)
    assert math.isclose(m.max_violation, 3 / 2 - 1)
    assert m.coactivation[0, 1] == 2 and m.coactivation[1, 2] == 1 and m.coactivation[0, 3] == 0
    assert m.coactivation.diagonal().tolist() == [2, 3, 2, 1]
    table = rec.stats["moe.router"].label_counts_LE
    assert table.tolist() == [[2, 2, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_recorder_keeps_logits_and_removes_hooks() -> None:
    model = nn.Sequential(moekit.MoE(moekit.TopKRouter(4, 3, 1), moekit.MLPExperts(3, 4, 8)))
    with moekit.RoutingRecorder(model, keep_logits=True, max_tokens=5) as rec:
        model[0](torch.randn(4, 4))
        model[0](torch.randn(4, 4))
    assert rec.stats["0.router"].logits_TE().shape == (5, 3)
    model[0](torch.randn(4, 4))
    assert rec.stats["0.router"].tokens == 8
