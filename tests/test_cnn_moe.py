"""ResBlock-MoE / Conv-MoE layers and the MoE ResNet-18: oracles (outputs and gradients), routing
per image, gates, bad input, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import (
    ConvMoE,
    ResBlockMoE,
    ResNetMoE,
    ResStageExperts,
    RoutingDecision,
    TopKRouter,
    load_checkpoint,
    save_checkpoint,
)
from moekit.experts.dispatch import dispatch, dispatch_reference
from moekit.layers.cnn_moe import ConvGAPGate, ImageMoE, stage_macs


class PlainBlock(nn.Module):
    """BasicBlock ``cin -> mid -> cout`` from ordinary modules (conv1 strided, 1x1 shortcut when needed)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def plain_stage(bank: ResStageExperts, e: int) -> nn.Sequential:
    """Expert e of the bank as ordinary nn.Conv2d / nn.BatchNorm2d blocks with copied tensors."""
    hidden = bank.hidden_channels
    stage = nn.Sequential(
        PlainBlock(bank.dim, hidden, hidden, bank.stride), PlainBlock(hidden, hidden, bank.out_dim, 1)
    )
    pairs = {"conv1": ("conv1", "bn1"), "conv2": ("conv2", "bn2"), "short": ("shortcut.0", "shortcut.1")}
    with torch.no_grad():
        for name, *_ in bank.specs:
            block, kind = stage[int(name[1])], name.split("_")[1]
            conv, bn = (block.get_submodule(p) for p in pairs[kind])
            conv.weight.copy_(getattr(bank, f"{name}_weight")[e])
            bn.weight.copy_(getattr(bank, f"{name}_bn_weight")[e])
            bn.bias.copy_(getattr(bank, f"{name}_bn_bias")[e])
            bn.running_mean.copy_(getattr(bank, f"{name}_bn_mean")[e])
            bn.running_var.copy_(getattr(bank, f"{name}_bn_var")[e])
    return stage


def _grads(bank: ResStageExperts, stage: nn.Sequential, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = {"conv1": ("conv1", "bn1"), "conv2": ("conv2", "bn2"), "short": ("shortcut.0", "shortcut.1")}
    out = []
    for name, *_ in bank.specs:
        block, kind = stage[int(name[1])], name.split("_")[1]
        conv, bn = (block.get_submodule(p) for p in pairs[kind])
        out += [
            (getattr(bank, f"{name}_weight").grad[e], conv.weight.grad),
            (getattr(bank, f"{name}_bn_weight").grad[e], bn.weight.grad),
        ]
    return out


@pytest.mark.parametrize("stride,in_ch,out_ch", [(1, 6, 6), (2, 4, 8)])
@pytest.mark.parametrize("training", [True, False])
def test_expert_equals_plain_resnet_stage(stride: int, in_ch: int, out_ch: int, training: bool) -> None:
    bank = ResStageExperts(3, in_ch, out_ch, 5, stride=stride).train(training)
    with torch.no_grad():  # non-trivial running statistics for eval mode
        for name, *_ in bank.specs:
            getattr(bank, f"{name}_bn_mean").uniform_(-0.5, 0.5)
            getattr(bank, f"{name}_bn_var").uniform_(0.5, 2.0)
    e = 1
    stage = plain_stage(bank, e).train(training)
    x = torch.randn(5, in_ch, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = bank.expert_forward(x, e), stage(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_ref * r).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for got, want in _grads(bank, stage, e):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bank.b1_conv2_bn_mean[e], stage[1].bn2.running_mean)
    assert bank.b1_conv2_weight.grad[0].abs().sum() == 0  # other experts untouched


def _decision(T: int, E: int, k: int, seed: int = 0) -> RoutingDecision:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    return RoutingDecision(
        ids_TK=ids, weights_TK=torch.rand(T, k, generator=gen).softmax(-1).requires_grad_(True), num_experts=E
    )


def test_sparse_dispatch_matches_reference_outputs_and_grads() -> None:
    bank = ResStageExperts(4, 4, 8, 3, stride=2).train()
    other = copy.deepcopy(bank)
    decision = _decision(7, 4, 2)
    x = torch.randn(7, 4, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = dispatch(bank, x, decision)
    y_ref = dispatch_reference(other, x2, decision)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    for (n, p), (_, q) in zip(bank.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)
    for (n, b), (_, c) in zip(bank.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(b, c, msg=n)  # per-expert BatchNorm saw the same images


def test_only_chosen_experts_run_on_whole_feature_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = ResBlockMoE(4, 4, num_experts=4, k=2, noisy=False).eval()
    calls: list[tuple[int, int]] = []
    run = ResStageExperts._run

    def spy(self, x, params, e):
        calls.append((e, x.shape[0]))
        assert x.shape[1:] == (4, 6, 6)  # a whole feature map per routed image
        return run(self, x, params, e)

    monkeypatch.setattr(ResStageExperts, "_run", spy)
    out = layer(torch.randn(9, 4, 6, 6))
    counts = out.decision.counts()
    assert sorted(calls) == sorted((e, int(c)) for e, c in enumerate(counts.tolist()) if c > 0)
    assert sum(n for _, n in calls) == 9 * 2


def test_sparse_equals_dense_combine_in_eval() -> None:
    torch.manual_seed(1)
    sparse = ResBlockMoE(4, 8, num_experts=4, k=2, stride=2).eval()
    dense = copy.deepcopy(sparse)
    dense.combine = "dense"
    x = torch.randn(6, 4, 8, 8)
    torch.testing.assert_close(sparse(x).y, dense(x).y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride,in_ch,out_ch", [(1, 4, 4), (2, 4, 8)])
def test_residual_variant_adds_the_stage_shortcut(stride: int, in_ch: int, out_ch: int) -> None:
    torch.manual_seed(0)
    plain = ResBlockMoE(in_ch, out_ch, stride=stride, residual=False).eval()
    torch.manual_seed(0)
    residual = ResBlockMoE(in_ch, out_ch, stride=stride, residual=True).eval()
    residual.load_state_dict({**residual.state_dict(), **plain.state_dict()})
    x = torch.randn(3, in_ch, 8, 8)
    assert plain.shortcut is None
    torch.testing.assert_close(residual(x).y, plain(x).y + residual.shortcut(x))


def test_conv_moe_equals_per_image_reference() -> None:
    layer = ConvMoE(3, 5, num_experts=4, k=2, stride=2, bias=True, noisy=False).eval()
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    out = layer(x)
    w, b = layer.experts.weight, layer.experts.bias
    ref = torch.stack(
        [
            sum(
                out.decision.weights_TK[t, s] * F.conv2d(x[t : t + 1], w[e], b[e], stride=2, padding=1)[0]
                for s, e in enumerate(out.decision.ids_TK[t].tolist())
            )
            for t in range(6)
        ]
    )
    torch.testing.assert_close(out.y, ref, atol=1e-5, rtol=1e-5)
    gx = torch.autograd.grad(out.y.square().sum(), x, retain_graph=True)[0]
    gx_ref = torch.autograd.grad(ref.square().sum(), x)[0]
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


def test_gap_gate_routes_on_pooled_features_and_conv_gate_learns() -> None:
    layer = ResBlockMoE(4, 4, num_experts=4, k=2, noisy=False).eval()
    x = torch.randn(5, 4, 6, 6)
    direct = layer.router(x.mean(dim=(2, 3)))
    torch.testing.assert_close(layer(x).decision.ids_TK, direct.ids_TK)
    conv = ResBlockMoE(4, 4, num_experts=4, k=2, gate="conv", gate_channels=7).train()
    assert isinstance(conv.gate, ConvGAPGate) and conv.router.dim == 7
    out = conv(x)
    (out.y.sum() + out.decision.weights_TK.sum() * 0 + out.decision.logits_TE.square().sum()).backward()
    assert conv.gate.conv.weight.grad.abs().sum() > 0


def test_gate_noise_only_in_training() -> None:
    layer = ResBlockMoE(4, 4, num_experts=4, k=2)
    with torch.no_grad():
        layer.router.noise.weight.fill_(1.0)  # large learned noise
    x = torch.randn(16, 4, 4, 4)
    layer.eval()
    torch.testing.assert_close(layer(x).decision.logits_TE, layer(x).decision.logits_TE)
    layer.train()
    assert not torch.equal(layer(x).decision.logits_TE, layer(x).decision.logits_TE)


def test_single_tiny_feature_map_per_expert_trains() -> None:
    layer = ResBlockMoE(4, 8, num_experts=4, k=1, stride=2, residual=False).train()
    out = layer(torch.randn(1, 4, 1, 1))  # one 1x1 map reaches one expert: BatchNorm uses running stats
    assert out.y.shape == (1, 8, 1, 1) and torch.isfinite(out.y).all()


def test_stage_macs_counts_every_convolution() -> None:
    bank = ResStageExperts(1, 4, 8, 3, stride=2)
    stage = plain_stage(bank, 0)
    total = []

    def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        total.append(m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * o.shape[2] * o.shape[3])

    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    stage(torch.randn(1, 4, 9, 9))
    assert stage_macs(4, 3, 8, 2, 9, 9) == sum(total)


@pytest.mark.parametrize("position", [1, 2, 3, 4])
def test_resnet_moe_positions(position: int) -> None:
    model = ResNetMoE(10, width=4, moe_position=position, num_experts=4, k=2)
    logits, outs = model(torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 10) and len(outs) == 1
    assert outs[0].decision.ids_TK.shape == (4, 2)
    stage = model.stages[position - 1]
    assert isinstance(stage, ResBlockMoE) and stage.experts.out_dim == 4 * 2 ** (position - 1)


def test_resnet_dense_and_conv_moe() -> None:
    dense_logits, dense_outs = ResNetMoE(10, width=4)(torch.randn(2, 3, 8, 8))
    assert dense_outs == [] and dense_logits.shape == (2, 10)
    model = ResNetMoE(
        5, width=4, moe_position=2, moe_type="conv", gate="conv", balancer="mean", balancer_kwargs={"tau": 0.2}
    )
    logits, outs = model(torch.randn(3, 3, 8, 8))
    assert logits.shape == (3, 5) and len(outs) == 4  # two blocks x two MoE convs
    assert all(isinstance(m, ConvMoE) for m in model.modules() if isinstance(m, ImageMoE))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"moe_position": 5}, "moe_position"),
        ({"moe_position": 0}, "moe_position"),
        ({"moe_position": 2, "k": 5, "num_experts": 4}, "k must be <= num_experts"),
        ({"moe_position": 2, "moe_type": "pixel"}, "moe_type"),
        ({"moe_position": 2, "gate": "mlp"}, "gate"),
        ({"moe_position": 2, "balancer": "relative", "balancer_kwargs": {"tau": 0.0}}, "tau"),
        ({"moe_position": 2, "balancer": "magic"}, "balancer"),
    ],
)
def test_resnet_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResNetMoE(10, width=4, **kwargs)


def test_wrong_channel_count_is_named() -> None:
    with pytest.raises(ValueError, match=r"C=3"):
        ResNetMoE(10, width=4, moe_position=1)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"C=4"):
        ResBlockMoE(4, 4)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        ResBlockMoE(4, 4, num_experts=2, k=3)
    with pytest.raises(TypeError, match="image expert bank"):
        from moekit import MLPExperts

        ImageMoE(TopKRouter(4, 2, 1), MLPExperts(2, 4, 8))


def test_checkpoint_round_trip_keeps_balancer_state(tmp_path) -> None:
    model = ResNetMoE(10, width=4, moe_position=3, balancer="relative", balancer_kwargs={"tau": 0.5}).train()
    for _ in range(2):
        model(torch.randn(8, 3, 8, 8))
    assert model.stages[2].router.balancer.deviation.abs().sum() > 0
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt").eval()
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    torch.testing.assert_close(loaded.stages[2].router.balancer.deviation, model.stages[2].router.balancer.deviation)


def test_benchmark_script_runs(tmp_path) -> None:
    """The speed benchmark runs on tiny shapes and reports both ratios (speed is not asserted here)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cnn_moe.py"
    cmd = [sys.executable, str(script), "--quick", "--reps", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench_cnn_moe_quick.json").read_text())["results"]["tiny"]
    assert result["moe_vs_equal_flop"] > 0 and result["moe_vs_dense"] > 0
    macs = result["mmacs_per_image"]
    assert abs(macs["equal-FLOP dense"] / macs["ResBlock-MoE"] - 1) < 0.1  # the baseline really is equal-FLOP
    assert "MoE / equal-FLOP dense" in (tmp_path / "bench_cnn_moe_quick.md").read_text()
