"""``moekit reproduce comet``: the COMET paper's gate comparison (Ibrahim et al., KDD 2023,
https://arxiv.org/abs/2306.02824) on multi-gate multi-task models.

Gates softmax, top-k, hash, DSelect-k and COMET, each sparse gate also with permutation local search
("+"), are tuned by random search with the same number of trials per gate on each data set (Ma et
al.'s synthetic regression tasks and MultiDigits; MultiMNIST / MultiFashion too when ``--idx-dir``
holds the IDX files). Reported as in the paper: the mean test metric of the best 5% of trials by
validation loss +- standard error, plus the expected best validation loss against the number of
trials (the tuning-budget curve) and per-expert utilisation of each gate's best trial.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data.idx import load_mnist
from ..data.multidigits import make_multidigits, overlay_split
from ..data.synthetic_multitask import MultiTaskSplit, make_synthetic_multitask
from ..models.multitask import MultiGateMoE, MultiTaskOutput
from ..reporting import check_report_dir, environment, report_directory, write_json
from ..routers import COMETRouter, DSelectKRouter, HashRouter, PermutationLocalSearch, Router, SoftmaxRouter, TopKRouter

__all__ = [
    "CometConfig",
    "DatasetSpec",
    "DATASETS",
    "GATES",
    "sample_hparams",
    "build_gate",
    "run_trial",
    "run_comet",
    "add_reproduce_parser",
]

GATES = ("softmax", "topk", "topk+", "hash", "hash+", "dselect", "dselect+", "comet", "comet+")


@dataclass(frozen=True)
class DatasetSpec:
    """Experts and cardinality per data set (the paper's MultiMNIST / MultiFashion settings where known)."""

    num_experts: int
    k: int


DATASETS = {
    "synthetic": DatasetSpec(8, 2),
    "multidigits": DatasetSpec(6, 2),
    "multimnist": DatasetSpec(16, 4),
    "multifashion": DatasetSpec(6, 2),
}


@dataclass(frozen=True)
class CometConfig:
    """Everything a run depends on. ``quick()`` is a seconds-long smoke run for tests."""

    datasets: tuple[str, ...] = ("synthetic", "multidigits")
    gates: tuple[str, ...] = GATES
    trials: int = 24
    epochs: int = 6
    batch_size: int = 128
    expert_hidden: int = 32
    expert_dim: int = 16
    tower_hidden: int = 16
    synthetic_samples: int = 4000
    synthetic_correlation: float = 0.5
    overlay_sizes: tuple[int, int, int] = (3000, 750, 750)
    idx_dir: str | None = None
    top_fraction: float = 0.05
    sparse_threshold: float = 0.9
    hash_bits: int = 8
    lr_range: tuple[float, float] = (5e-4, 1e-2)
    gamma_range: tuple[float, float] = (0.001, 1.0)
    entropy_range: tuple[float, float] = (1e-3, 3.0)
    local_search_range: tuple[float, float] = (0.02, 0.2)
    perm_entropy: float = 1e-4
    unreachable: float = 1.0
    seed: int = 0

    @classmethod
    def quick(cls) -> "CometConfig":
        return cls(trials=2, epochs=1, synthetic_samples=300, overlay_sizes=(200, 60, 60), batch_size=64)


def _log_uniform(gen: torch.Generator, low: float, high: float) -> float:
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand((), generator=gen)))


def sample_hparams(gate: str, cfg: CometConfig, gen: torch.Generator) -> dict[str, float]:
    """One random-search draw: learning rate for every gate; gamma and entropy coefficient for
    DSelect-k / COMET; the fraction of training that learns the permutation for "+" gates."""
    hp = {"lr": _log_uniform(gen, *cfg.lr_range)}
    base = gate.rstrip("+")
    if base in ("dselect", "comet"):
        hp["gamma"] = _log_uniform(gen, *cfg.gamma_range)
        hp["entropy"] = _log_uniform(gen, *cfg.entropy_range)
    if gate.endswith("+"):
        low, high = cfg.local_search_range
        hp["local_search_fraction"] = low + (high - low) * float(torch.rand((), generator=gen))
    return hp


def build_gate(
    gate: str, hp: dict[str, float], *, dim: int, spec: DatasetSpec, num_keys: int, learn_steps: int, seed: int
) -> Router:
    """One task gate by experiment name (``"comet+"`` = COMET wrapped in permutation local search)."""
    base, n, k = gate.rstrip("+"), spec.num_experts, spec.k
    if base == "softmax":
        router: Router = SoftmaxRouter(dim, n)
    elif base == "topk":
        router = TopKRouter(dim, n, k, noisy=False)  # the paper's top-k runs: no jitter, no balancing loss
    elif base == "hash":
        router = HashRouter(dim, n, num_keys, k, key="hash_key", seed=seed)
    elif base == "dselect":
        router = DSelectKRouter(dim, n, k, gamma=hp["gamma"])
    elif base == "comet":
        router = COMETRouter(dim, n, k, gamma=hp["gamma"])
    else:
        raise ValueError(f"gate must be one of {list(GATES)}, got {gate!r}")
    if gate.endswith("+"):
        router = PermutationLocalSearch(router, learn_steps=learn_steps)
    return router


def hash_keys(x: Tensor, bits: int, seed: int) -> Tensor:
    """A locality-sensitive hash of each input: the signs of ``bits`` fixed random projections ``[N]``."""
    proj = torch.randn(x.shape[1], bits, generator=torch.Generator().manual_seed(seed))
    weights = 2 ** torch.arange(bits)
    return ((x @ proj > 0).long() * weights).sum(-1)


def load_dataset(name: str, cfg: CometConfig) -> MultiTaskSplit:
    if name == "synthetic":
        return make_synthetic_multitask(cfg.synthetic_samples, correlation=cfg.synthetic_correlation, seed=cfg.seed)
    n_tr, n_va, n_te = cfg.overlay_sizes
    if name == "multidigits":
        return make_multidigits(n_tr, n_va, n_te, seed=cfg.seed)
    if name in ("multimnist", "multifashion"):
        if cfg.idx_dir is None:
            raise ValueError(f"dataset {name!r} needs --idx-dir, a directory with the MNIST / Fashion-MNIST IDX files")
        images, labels = load_mnist(Path(cfg.idx_dir) / name.replace("multi", ""), "train")
        return overlay_split(images, labels, num_train=n_tr, num_val=n_va, num_test=n_te, shift=4, seed=cfg.seed)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


def _batches(n: int, size: int, gen: torch.Generator | None = None) -> list[Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


def _loss(
    model: MultiGateMoE, out: MultiTaskOutput, ys: list[Tensor], hp: dict[str, float], cfg: CometConfig
) -> Tensor:
    total = sum(model.task_losses(out, ys), torch.zeros(()))
    for moe in out.moe:
        total = total + hp.get("entropy", 0.0) * moe.aux.get("entropy_reg", 0.0)
        total = (
            total
            + cfg.unreachable * moe.aux.get("unreachable", 0.0)
            + cfg.perm_entropy * moe.aux.get("perm_entropy", 0.0)
        )
    return total


@torch.no_grad()
def evaluate(model: MultiGateMoE, x: Tensor, ys: list[Tensor], keys: Tensor, k: int) -> dict[str, Any]:
    """Per-task loss and metric, and per-gate routing: slots (experts run) and gate weight per
    expert, experts run per example, fraction of examples routed to at most ``k`` experts."""
    model.eval()
    T = len(model.tasks)
    loss_sum, metric_sum = [0.0] * T, [0.0] * T
    counts = torch.zeros(T, model.experts.num_experts)
    weight = torch.zeros(T, model.experts.num_experts)
    run, hard = [0.0] * T, [0.0] * T
    for idx in _batches(x.shape[0], 1024):
        out = model(x[idx], meta={"hash_key": keys[idx]})
        targets = [y[idx] for y in ys]
        for t, (l, m) in enumerate(zip(model.task_losses(out, targets), model.task_metrics(out, targets))):
            loss_sum[t] += float(l) * len(idx)
            metric_sum[t] += m * len(idx)
        for t, moe in enumerate(out.moe):
            d = moe.decision
            kept = d.kept_mask() & (d.effective_weights() != 0)
            counts[t] += torch.bincount(d.ids_TK[kept], minlength=d.num_experts).float()
            weight[t] += d.gates_TE().float().sum(0)
            per_example = kept.sum(-1)
            run[t] += float(per_example.sum())
            hard[t] += float((per_example <= k).sum())
    n = x.shape[0]
    return {
        "loss": [v / n for v in loss_sum],
        "metric": [v / n for v in metric_sum],
        "slots_per_expert": counts.tolist(),
        "weight_per_expert": weight.tolist(),
        "experts_per_example": [v / n for v in run],
        "fraction_hard": [v / n for v in hard],
    }


def run_trial(
    data: MultiTaskSplit,
    keys: dict[str, Tensor],
    gate: str,
    hp: dict[str, float],
    spec: DatasetSpec,
    cfg: CometConfig,
    seed: int,
) -> dict[str, Any]:
    """Train one configuration; early stopping by validation loss (sum over tasks) at epoch ends."""
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(data.x_train.shape[0] / cfg.batch_size)
    learn_steps = max(1, round(hp.get("local_search_fraction", 0.0) * steps_per_epoch * cfg.epochs))
    gates = [
        build_gate(
            gate,
            hp,
            dim=data.num_features,
            spec=spec,
            num_keys=2**cfg.hash_bits,
            learn_steps=learn_steps,
            seed=seed + t,
        )
        for t in range(len(data.tasks))
    ]
    model = MultiGateMoE(
        data.num_features,
        data.tasks,
        num_experts=spec.num_experts,
        expert_dim=cfg.expert_dim,
        expert_hidden=cfg.expert_hidden,
        tower_hidden=cfg.tower_hidden,
        gates=gates,
    )
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, int, dict[str, Tensor]] | None = None
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        for idx in _batches(data.x_train.shape[0], cfg.batch_size, gen):
            out = model(data.x_train[idx], meta={"hash_key": keys["train"][idx]})
            loss = _loss(model, out, [y[idx] for y in data.ys_train], hp, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_loss = sum(evaluate(model, data.x_val, data.ys_val, keys["val"], spec.k)["loss"])
        if math.isfinite(val_loss) and (best is None or val_loss < best[0]):
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
    train_s = time.perf_counter() - start
    if best is None:  # diverged at every epoch
        return {"gate": gate, "hparams": hp, "val_loss": math.inf, "best_epoch": -1, "train_s": train_s, "test": None}
    model.load_state_dict(best[2])
    test = evaluate(model, data.x_test, data.ys_test, keys["test"], spec.k)
    return {"gate": gate, "hparams": hp, "val_loss": best[0], "best_epoch": best[1], "train_s": train_s, "test": test}


def run_comet(
    cfg: CometConfig, out_dir: str | Path | None = None, *, quiet: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the random search for every data set and gate; write the report when ``out_dir`` is set."""
    if out_dir is not None:
        check_report_dir(out_dir)
    unknown = [g for g in cfg.gates if g not in GATES] + [d for d in cfg.datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown gates/datasets {unknown}; gates: {list(GATES)}, datasets: {list(DATASETS)}")
    if cfg.trials < 1 or cfg.epochs < 1:
        raise ValueError(f"trials and epochs must be >= 1, got trials={cfg.trials}, epochs={cfg.epochs}")
    datasets: dict[str, Any] = {}
    for d_index, name in enumerate(cfg.datasets):
        data, spec = load_dataset(name, cfg), DATASETS[name]
        keys = {
            part: hash_keys(x, cfg.hash_bits, cfg.seed)
            for part, x in (("train", data.x_train), ("val", data.x_val), ("test", data.x_test))
        }
        trials: dict[str, list[dict[str, Any]]] = {}
        bar = tqdm(total=len(cfg.gates) * cfg.trials, desc=name, disable=quiet, leave=False)
        for g_index, gate in enumerate(cfg.gates):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + d_index * 1009 + g_index)
            trials[gate] = []
            for trial in range(cfg.trials):
                hp = sample_hparams(gate, cfg, gen)
                trials[gate].append(run_trial(data, keys, gate, hp, spec, cfg, seed=cfg.seed + 7919 * trial + g_index))
                bar.update()
            best = min(r["val_loss"] for r in trials[gate])
            echo(f"{name:<12} {gate:<9} best val loss {best:.4f}  ({sum(r['train_s'] for r in trials[gate]):.0f}s)")
        bar.close()
        datasets[name] = {
            "tasks": [asdict(t) for t in data.tasks],
            "metric": data.tasks[0].metric,
            "num_experts": spec.num_experts,
            "k": spec.k,
            "sizes": [data.x_train.shape[0], data.x_val.shape[0], data.x_test.shape[0]],
            "features": data.num_features,
            "trials": trials,
        }
    results = {
        "experiment": "comet",
        "paper": "https://arxiv.org/abs/2306.02824",
        "config": asdict(cfg),
        "environment": environment(),
        "datasets": datasets,
    }
    if out_dir is not None:
        from .comet_report import write_report

        with report_directory(out_dir) as out:
            write_json(out / "results.json", results)
            write_report(results, out)
    return results


def add_reproduce_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "comet", help="COMET: tree gate, DSelect-k, top-k, hash (+ local search) on multi-task data"
    )
    parser.add_argument("--out", default="reports/comet", help="output directory (report.md, results.json, PNGs)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--trials", type=int, default=None, help="random-search trials per gate and data set")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--gates", default=None, help=f"comma-separated subset of {','.join(GATES)}")
    parser.add_argument("--datasets", default=None, help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument(
        "--idx-dir", default=None, help="directory with mnist/ and fashion/ IDX files (for multimnist, multifashion)"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest for these small models on a busy machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = CometConfig.quick() if args.quick else CometConfig()
    overrides: dict[str, Any] = {
        "trials": args.trials,
        "epochs": args.epochs,
        "seed": args.seed,
        "idx_dir": args.idx_dir,
    }
    if args.gates:
        overrides["gates"] = tuple(g.strip() for g in args.gates.split(",") if g.strip())
    if args.datasets:
        overrides["datasets"] = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    run_comet(cfg, args.out, quiet=args.quiet)
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0
