"""``moekit reproduce smear``: SMEAR's adapter comparison on multi-domain digits (Muqeeth et al., TMLR 2024,
https://arxiv.org/abs/2306.03745; the ResNet-18 / DomainNet setting scaled down to run on a CPU).

A ResNet-18 (moekit's ``ResNetMoE`` without MoE stage) is pretrained on the *clean* domain only, then
frozen. Routed adapters (``insert_routed_adapters``) go after each of its 8 BasicBlocks -- a bottleneck
at every spatial position, routed per image on the spatial mean, one expert per domain -- and are
trained with a new classifier head on all domains, once per routing method of
``moekit.layers.ROUTED_METHODS`` and seed. Reported: accuracy (overall and per domain, mean ± std over
seeds), trainable parameters, training and inference time, and the routing distribution per domain
(does SMEAR specialise experts by domain without being told?).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..analysis.metrics import joint_counts, label_entropy, mutual_information
from ..data.domains import DOMAINS, load_domain_digits
from ..data.images import ImageSplit
from ..layers.adapters import adapter_context, adapter_sites, insert_routed_adapters
from ..layers.baselines import ROUTED_METHODS
from ..models.resnet_moe import BasicBlock, ResNetMoE
from ..reporting import check_report_dir, environment, report_directory, write_json
from ..routers.estimators import reinforce_terms

__all__ = ["SmearConfig", "pretrain_backbone", "run_method", "run_smear", "add_reproduce_parser"]


@dataclass(frozen=True)
class SmearConfig:
    """Everything a run depends on. ``quick()`` is a seconds-long smoke run for tests.

    ``num_experts=None`` uses one expert per domain (as the paper's ResNet runs). The REINFORCE, DSelect-k
    and ST-Gumbel settings are the official code's (``aux_weights``; ``gumbel_anneal`` is the fraction of
    training after which the temperature reaches its floor, replacing the official per-step rate, which
    assumes 100k steps).
    """

    methods: tuple[str, ...] = tuple(ROUTED_METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    domains: tuple[str, ...] = tuple(DOMAINS)
    image_size: int = 12
    width: int = 8
    num_train: int | None = 6000
    num_test: int | None = None
    pretrain_epochs: int = 10
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    num_experts: int | None = None
    bottleneck: int = 8
    expert_dropout: float = 0.1
    gumbel_tau: tuple[float, float] = (10.0, 0.5)
    gumbel_anneal: float = 0.7
    dselect_gamma: float = 1.0
    aux_weights: Mapping[str, float] = field(default_factory=lambda: {
        "policy": 0.01, "entropy": 5e-4, "value": 0.01, "entropy_reg": 0.1, "unreachable": 0.1})  # fmt: skip
    grad_clip: float = 1.0
    data_seed: int = 0

    @classmethod
    def quick(cls) -> "SmearConfig":
        return cls(seeds=(0,), domains=("clean", "inverted", "rotated"), image_size=8, width=4, num_train=240,
                   num_test=120, pretrain_epochs=1, epochs=1, batch_size=64)  # fmt: skip

    @property
    def experts(self) -> int:
        return self.num_experts if self.num_experts is not None else len(self.domains)


def _check(cfg: SmearConfig) -> None:
    unknown = [m for m in cfg.methods if m not in ROUTED_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ROUTED_METHODS)}")
    if not cfg.methods or not cfg.seeds:
        raise ValueError(f"need at least one method and one seed, got methods={cfg.methods}, seeds={cfg.seeds}")
    for name in ("pretrain_epochs", "epochs", "batch_size", "bottleneck", "width", "experts"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 < cfg.gumbel_anneal <= 1:
        raise ValueError(f"gumbel_anneal must be in (0, 1], got {cfg.gumbel_anneal}")


def load_data(cfg: SmearConfig) -> ImageSplit:
    data = load_domain_digits(domains=cfg.domains, size=cfg.image_size, seed=cfg.data_seed)
    if cfg.num_train is None and cfg.num_test is None:
        return data
    gen = torch.Generator().manual_seed(cfg.data_seed)  # a random subset keeps every domain
    tr = torch.randperm(data.x_train.shape[0], generator=gen)[: cfg.num_train]
    te = torch.randperm(data.x_test.shape[0], generator=gen)[: cfg.num_test]
    return ImageSplit(data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], data.num_classes, data.name,
                      {k: v[tr] for k, v in data.meta_train.items()}, {k: v[te] for k, v in data.meta_test.items()},
                      data.class_names)  # fmt: skip


def _batches(n: int, size: int, gen: torch.Generator | None = None) -> list[Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


def pretrain_backbone(cfg: SmearConfig, data: ImageSplit, *, quiet: bool = True) -> tuple[ResNetMoE, float]:
    """Train the ResNet on the clean domain only; returns it (eval mode) and the training time."""
    torch.manual_seed(cfg.data_seed)
    model = ResNetMoE(data.num_classes, in_channels=data.channels, width=cfg.width)
    domain = cfg.domains.index("clean") if "clean" in cfg.domains else 0  # no clean domain: the first one
    x, y = data.x_train[data.meta_train["domain"] == domain], data.y_train[data.meta_train["domain"] == domain]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(cfg.pretrain_epochs), desc="pretrain (clean)", disable=quiet, leave=False):
        for idx in _batches(x.shape[0], cfg.batch_size, gen):
            loss = F.cross_entropy(model(x[idx])[0], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), time.perf_counter() - start


def _router_kwargs(method: str, cfg: SmearConfig, total_steps: int) -> dict[str, Any]:
    if method in ("smear", "ensemble"):
        return {"expert_dropout": cfg.expert_dropout}
    if method == "st_gumbel":
        start, floor = cfg.gumbel_tau
        decay = math.log(start / floor) / max(1.0, cfg.gumbel_anneal * total_steps)
        return {"tau_start": start, "tau_min": floor, "decay": decay}
    if method == "dselect":
        return {"gamma": cfg.dselect_gamma}
    return {}


def _aux_loss(method: str, outputs: Mapping[str, Any], ce_B: Tensor, weights: Mapping[str, float]) -> Tensor:
    """The method's extra training terms summed over sites: REINFORCE's policy/entropy/value terms
    (per-example loss as the reward), DSelect-k's selector entropy and unreachable-code penalty."""
    total = ce_B.new_zeros(())
    for out in outputs.values():
        terms = reinforce_terms(out.decision, ce_B) if method == "reinforce" else dict(out.aux)
        total = total + sum(weights.get(name, 0.0) * value for name, value in terms.items())
    return total


def _meta(data: ImageSplit, part: str, idx: Tensor) -> dict[str, Tensor]:
    meta = data.meta_train if part == "train" else data.meta_test
    return {"tag": meta["domain"][idx], "example_ids": meta["example_id"][idx]}


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSplit, cfg: SmearConfig) -> dict[str, Any]:
    """Accuracy overall and per domain, inference time, and per site the mean (normalised) routing weights
    per domain ``[domains, E]`` and the mutual information between domain and top expert (bits)."""
    model.eval()
    domain = data.meta_test["domain"]
    D, n = len(cfg.domains), data.x_test.shape[0]
    correct = torch.zeros(n, dtype=torch.bool)
    gates: dict[str, list[Tensor]] = {}
    infer_s = 0.0
    has_adapters = hasattr(model, "moekit_adapters")
    for idx in _batches(n, 256):
        context = adapter_context(model, meta=_meta(data, "test", idx)) if has_adapters else contextlib.nullcontext({})
        with context as outs:
            start = time.perf_counter()
            logits = model(data.x_test[idx])[0]
            infer_s += time.perf_counter() - start
        correct[idx] = logits.argmax(-1) == data.y_test[idx]
        for site, out in outs.items():
            g = out.decision.gates_TE().float()  # normalised: top-1's weight is its probability, not 1
            gates.setdefault(site, []).append(g / g.sum(-1, keepdim=True).clamp_min(1e-12))
    routing, mi = {}, {}
    for site, parts in gates.items():
        g = torch.cat(parts)
        if g.shape[1] < 2:
            continue
        table = torch.zeros(D, g.shape[1], dtype=torch.float64).index_add_(0, domain, g.double())
        routing[site] = (table / torch.bincount(domain, minlength=D).clamp_min(1).unsqueeze(1)).tolist()
        mi[site] = mutual_information(joint_counts(domain, g.argmax(-1), D, g.shape[1])) / math.log(2)
    per_domain = [float(correct[domain == d].float().mean()) if (domain == d).any() else math.nan for d in range(D)]
    return {"accuracy": float(correct.float().mean()), "per_domain": per_domain,
            "infer_ms_per_1k": 1e6 * infer_s / n, "routing": routing, "domain_expert_mi_bits": mi}  # fmt: skip


def run_method(method: str, seed: int, backbone: ResNetMoE, data: ImageSplit, cfg: SmearConfig) -> dict[str, Any]:
    """Adapters with ``method`` at every block of a copy of the frozen backbone, trained with a new head."""
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone)
    steps = cfg.epochs * math.ceil(data.x_train.shape[0] / cfg.batch_size)
    num_keys = int(torch.cat([data.meta_train["example_id"], data.meta_test["example_id"]]).max()) + 1
    insert_routed_adapters(model, BasicBlock, method=method, num_experts=cfg.experts, bottleneck=cfg.bottleneck,
                           num_keys=num_keys, causal=False, bank_kwargs={"activation": "silu"},
                           router_kwargs=_router_kwargs(method, cfg, steps))  # fmt: skip
    model.head.reset_parameters()
    model.head.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    adapter_params = sum(p.numel() for p in model.moekit_adapters.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        model.eval()  # the frozen backbone's BatchNorm statistics stay as pretrained
        model.moekit_adapters.train()
        for idx in _batches(data.x_train.shape[0], cfg.batch_size, gen):
            with adapter_context(model, meta=_meta(data, "train", idx)) as outs:
                logits = model(data.x_train[idx])[0]
            ce = F.cross_entropy(logits, data.y_train[idx], reduction="none")
            loss = ce.mean() + _aux_loss(method, outs, ce.detach(), cfg.aux_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
    train_s = time.perf_counter() - start
    result = evaluate(model, data, cfg)
    return {"method": method, "seed": seed, "train_s": train_s, "trainable_params": sum(p.numel() for p in params),
            "adapter_params": adapter_params, "sites": list(adapter_sites(model)), **result}  # fmt: skip


def run_smear(cfg: SmearConfig, out_dir: str | Path | None = None, *, quiet: bool = False,
              echo: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Pretrain the backbone, run every method and seed, write the report when ``out_dir`` is set."""
    _check(cfg)
    if out_dir is not None:
        check_report_dir(out_dir)
    data = load_data(cfg)
    backbone, pretrain_s = pretrain_backbone(cfg, data, quiet=quiet)
    zero_shot = evaluate(backbone, data, cfg)
    echo(f"backbone pretrained in {pretrain_s:.0f}s; zero-shot test accuracy {zero_shot['accuracy']:.3f}")
    runs = []
    bar = tqdm(total=len(cfg.methods) * len(cfg.seeds), desc="methods x seeds", disable=quiet)
    for method in cfg.methods:
        for seed in cfg.seeds:
            runs.append(run_method(method, seed, backbone, data, cfg))
            bar.set_postfix(method=method, acc=f"{runs[-1]['accuracy']:.3f}")
            bar.update()
        accs = [r["accuracy"] for r in runs if r["method"] == method]
        echo(f"{method:<17} accuracy {sum(accs) / len(accs):.4f} over {len(accs)} seed(s)")
    bar.close()
    results = {"experiment": "smear", "paper": "https://arxiv.org/abs/2306.03745", "config": asdict(cfg),
               "environment": environment(), "data": {"name": data.name, "train": data.x_train.shape[0],
               "test": data.x_test.shape[0], "domains": list(cfg.domains), "image": list(data.x_train.shape[1:]),
               "domain_entropy_bits": label_entropy(data.meta_test["domain"]) / math.log(2)},
               "pretrain_s": pretrain_s, "runs": runs,
               "zero_shot": {"accuracy": zero_shot["accuracy"], "per_domain": zero_shot["per_domain"]}}  # fmt: skip
    if out_dir is not None:
        from .smear_report import write_report

        with report_directory(out_dir) as out:
            write_json(out / "results.json", results)
            write_report(results, out)
    return results


def add_reproduce_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "smear", help="SMEAR: merged-expert adapters vs tag/hash/top-1/estimators/ensembles on multi-domain digits"
    )
    parser.add_argument("--out", default="reports/smear", help="output directory (report.md, results.json, PNGs)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ROUTED_METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="adapter training epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="backbone epochs on the clean domain")
    parser.add_argument("--num-train", type=int, default=None, help="random subset of the training images")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for these small models on a busy machine)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = SmearConfig.quick() if args.quick else SmearConfig()
    overrides: dict[str, Any] = {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs}
    if args.num_train is not None:
        overrides["num_train"] = args.num_train
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.seeds:
        try:
            overrides["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError as err:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from err
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    run_smear(cfg, args.out, quiet=args.quiet)
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0
