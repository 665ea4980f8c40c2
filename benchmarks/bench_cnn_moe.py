"""Training-step time (forward + backward) of a ResBlock-MoE (E=4, top-2 per image) against

* the dense ResNet stage it replaces (two full-width BasicBlocks), and
* an equal-FLOP dense stage: one narrow stage (same structure as an expert) whose inner width is
  chosen so that its MACs match the MoE's active MACs (k experts + shortcut), plus the same shortcut.

Same batch for all; per-image routing sends whole feature maps to the chosen experts (sort by
expert -> each expert's convolutions on its images -> weighted scatter back). Goal: the MoE within
1.5x of the equal-FLOP dense stage.

    python benchmarks/bench_cnn_moe.py            # ResNet-18 (width 64) stages 2 and 3 on 32x32 CIFAR inputs
    python benchmarks/bench_cnn_moe.py --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moekit.layers.cnn_moe import ResBlockMoE, ResStageExperts, stage_macs
from moekit.models.resnet_moe import BasicBlock
from moekit.reporting import atomic_write_text, environment, markdown_table, write_json

# stage position -> (in channels, out channels, stride, input H=W) of a width-64 CIFAR ResNet-18
SHAPES = {
    "stage2": dict(cin=64, cout=128, stride=2, hw=32, batch=64),
    "stage3": dict(cin=128, cout=256, stride=2, hw=16, batch=64),
}
QUICK = {"tiny": dict(cin=8, cout=16, stride=2, hw=16, batch=16)}
E, K, RATIO = 4, 2, 0.39


class NarrowDense(nn.Module):
    """One narrow stage (an expert's structure) plus the stage shortcut: the equal-FLOP dense baseline."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int) -> None:
        super().__init__()
        self.stage = ResStageExperts(1, cin, cout, hidden, stride=stride)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage.expert_forward(x, 0) + self.shortcut(x)


def equal_flop_hidden(cin: int, cout: int, stride: int, hw: int, target: int) -> int:
    """Inner width whose narrow stage (+ shortcut) has the MACs closest to ``target``."""
    short = cin * cout * (hw // stride) ** 2
    return min(range(1, 4 * cout), key=lambda h: abs(stage_macs(cin, h, cout, stride, hw, hw) + short - target))


def time_step(
    module: nn.Module, x: torch.Tensor, run: Callable[[nn.Module, torch.Tensor], torch.Tensor], reps: int
) -> float:
    """Fastest of ``reps`` forward+backward steps in seconds (after one warm-up step); the minimum,
    not the median, because the machine may be shared and other load only ever adds time."""
    module.train()
    times = []
    for i in range(reps + 1):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        run(module, x).square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def bench_shape(shape: dict, reps: int) -> dict:
    torch.manual_seed(0)
    cin, cout, s, hw, B = shape["cin"], shape["cout"], shape["stride"], shape["hw"], shape["batch"]
    hidden = max(1, round(RATIO * cout))
    out_hw = (hw - 1) // s + 1
    short_macs = cin * cout * out_hw**2
    macs = {
        "dense stage": stage_macs(cin, cout, cout, s, hw, hw),
        "ResBlock-MoE": K * stage_macs(cin, hidden, cout, s, hw, hw) + short_macs + E * cin,
    }
    h_eq = equal_flop_hidden(cin, cout, s, hw, macs["ResBlock-MoE"])
    macs["equal-FLOP dense"] = stage_macs(cin, h_eq, cout, s, hw, hw) + short_macs
    x = torch.randn(B, cin, hw, hw)
    modules = {
        "dense stage": (nn.Sequential(BasicBlock(cin, cout, s), BasicBlock(cout, cout)), lambda m, x: m(x)),
        "ResBlock-MoE": (
            ResBlockMoE(cin, cout, num_experts=E, k=K, hidden_channels=hidden, stride=s),
            lambda m, x: m(x).y,
        ),
        "equal-FLOP dense": (NarrowDense(cin, cout, h_eq, s), lambda m, x: m(x)),
    }
    ms = {name: 1e3 * time_step(m, x, run, reps) for name, (m, run) in modules.items()}
    return {
        "shape": shape,
        "expert_hidden": hidden,
        "equal_flop_hidden": h_eq,
        "mmacs_per_image": {k: v / 1e6 for k, v in macs.items()},
        "ms": ms,
        "moe_vs_dense": ms["ResBlock-MoE"] / ms["dense stage"],
        "moe_vs_equal_flop": ms["ResBlock-MoE"] / ms["equal-FLOP dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1, stable on a shared machine; 0 = torch's default)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else SHAPES
    results = {name: bench_shape(shape, args.reps) for name, shape in shapes.items()}
    stem = "bench_cnn_moe_quick" if args.quick else "bench_cnn_moe"
    out = Path(args.out)
    write_json(
        out / f"{stem}.json",
        {"environment": environment(), "experts": E, "k": K, "expert_ratio": RATIO, "results": results},
    )
    lines = [
        f"training step (forward + backward), fp32, {environment()['processor']}, "
        f"{torch.get_num_threads()} threads, fastest of {args.reps} steps\n"
    ]
    for name, r in results.items():
        sh = r["shape"]
        lines.append(
            f"\n**{name}**: {sh['cin']} -> {sh['cout']} channels, stride {sh['stride']}, "
            f"{sh['hw']}x{sh['hw']} input, batch {sh['batch']}; "
            f"E={E}, k={K}, expert width {r['expert_hidden']}, equal-FLOP width {r['equal_flop_hidden']}\n\n"
        )
        rows = [[m, r["mmacs_per_image"][m], r["ms"][m], r["ms"][m] / r["ms"]["equal-FLOP dense"]] for m in r["ms"]]
        lines.append(
            markdown_table(["module", "MMAC / image", "ms / step", "x equal-FLOP dense"], rows, floatfmt=".3g")
        )
        lines.append(
            f"\nMoE / dense stage: **{r['moe_vs_dense']:.2f}x**; "
            f"MoE / equal-FLOP dense: **{r['moe_vs_equal_flop']:.2f}x** (goal <= 1.5x)\n"
        )
    atomic_write_text(out / f"{stem}.md", "".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
