"""SMEAR's adapter comparison on multi-domain digits (Muqeeth et al., TMLR 2024,
https://arxiv.org/abs/2306.03745; the ResNet-18 / DomainNet setting scaled down to run on a CPU).

For every seed: a new train/validation/test split of the digits (validation and test digits are unseen
in training, in every domain), and a new ResNet-18 (moekit's ``ResNetMoE`` without MoE stage)
pretrained on the *clean* domain only, then frozen. Routed adapters (``insert_routed_adapters``) go
after each of its 8 BasicBlocks -- a bottleneck at every spatial position, routed per image on the
spatial mean, one expert per domain -- and are trained with a new classifier head on all domains,
once per method (``METHODS``). Each run keeps the epoch with the best validation accuracy (early
stopping with ``patience``) and is tested once. ``run_smear(cfg)`` returns the results dict (see
``moekit.experiments.common`` for its layout) and writes the report when given a directory, with the
first seed's routed models (``checkpoints/<method>-s<seed>``) and test images (``eval_set.safetensors``) for
``moekit analyze``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis.metrics import joint_counts, label_entropy, mutual_information
from ..data.domains import DOMAINS, load_domain_digits
from ..data.images import ImageSplit
from ..layers.adapters import adapter_context, adapter_sites, insert_routed_adapters
from ..layers.baselines import ROUTED_METHODS
from ..models.resnet_moe import BasicBlock, ResNetMoE
from ..progress import Progress
from ..reporting import atomic_directory, write_json
from ..routers.base import Router
from ..routers.estimators import reinforce_terms
from ..training import training_steps
from .common import TIMING_KEY, checkpoint_entry, pinned_threads, results_header, save_run_models, start_run

__all__ = ["METHODS", "SmearConfig", "load_seed_data", "pretrain_backbone", "run_method", "run_smear"]

PAPER = "https://arxiv.org/abs/2306.03745"

#: the first seed's test images (with the domain tags and example ids the routers read), for moekit analyze
EVAL_SET = "eval_set.safetensors"
#: every method of the comparison: moekit's routed methods and SMEAR with twice the experts
METHODS: dict[str, str] = {**ROUTED_METHODS, "smear_2x": "SMEAR with twice as many experts (2E)"}


@dataclass(frozen=True)
class SmearConfig:
    """Everything a run depends on. ``quick()`` is a seconds-long smoke run for tests.

    ``num_experts=None`` uses one expert per domain (as the paper's ResNet runs). ``expert_dropout``
    applies to SMEAR, the ensemble and top-1, as in the official code. The REINFORCE, DSelect-k and
    ST-Gumbel settings are the official code's (``aux_weights``; ``gumbel_anneal`` is the fraction of
    the maximum training steps after which the temperature reaches its floor, replacing the official
    per-step rate, which assumes 100k steps). ``skills_lr_scale``: Latent Skills' logits learn this
    many times faster (official: 10).
    """

    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    domains: tuple[str, ...] = tuple(DOMAINS)
    image_size: int = 12
    width: int = 8
    val_fraction: float = 0.15
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    pretrain_epochs: int = 10
    epochs: int = 7
    patience: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    num_experts: int | None = None
    bottleneck: int = 8
    expert_dropout: float = 0.1
    gumbel_tau: tuple[float, float] = (10.0, 0.5)
    gumbel_anneal: float = 0.7
    dselect_gamma: float = 1.0
    skills_lr_scale: float = 10.0
    aux_weights: Mapping[str, float] = field(default_factory=lambda: {
        "policy": 0.01, "entropy": 5e-4, "value": 0.01, "entropy_reg": 0.1, "unreachable": 0.1})  # fmt: skip
    grad_clip: float = 1.0
    threads: int = 1

    @classmethod
    def quick(cls) -> "SmearConfig":
        return cls(seeds=(0,), domains=("clean", "inverted", "rotated"), image_size=8, width=4, num_train=240,
                   num_val=60, num_test=120, pretrain_epochs=1, epochs=1, batch_size=64)  # fmt: skip

    @property
    def experts(self) -> int:
        return self.num_experts if self.num_experts is not None else len(self.domains)

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if not self.methods or not self.seeds:
            raise ValueError(f"need at least one method and one seed, got methods={self.methods}, seeds={self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        for name in ("pretrain_epochs", "epochs", "patience", "batch_size", "bottleneck", "width", "experts",
                     "threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.gumbel_anneal <= 1:
            raise ValueError(f"gumbel_anneal must be in (0, 1], got {self.gumbel_anneal}")


@dataclass(frozen=True)
class SeedData:
    """One seed's split: ``fit.x_train`` to train, ``fit.x_test`` to validate, ``test.x_test`` to test."""

    fit: ImageSplit
    test: ImageSplit


def load_seed_data(cfg: SmearConfig, seed: int) -> SeedData:
    """The seed's train/test split of the digits and a validation split held out by digit."""
    data = load_domain_digits(domains=cfg.domains, size=cfg.image_size, seed=seed)
    fit = data.holdout(cfg.val_fraction, seed=seed, group="digit_id").subset(cfg.num_train, cfg.num_val, seed=seed)
    return SeedData(fit, data.subset(None, cfg.num_test, seed=seed))


def _batches(n: int, size: int, gen: torch.Generator | None = None) -> list[Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


def pretrain_backbone(cfg: SmearConfig, data: ImageSplit, seed: int) -> ResNetMoE:
    """Train the ResNet on the clean training images only (the first domain if there is no clean one)."""
    torch.manual_seed(seed)
    model = ResNetMoE(data.num_classes, in_channels=data.channels, width=cfg.width)
    domain = cfg.domains.index("clean") if "clean" in cfg.domains else 0
    pick = data.meta_train["domain"] == domain
    x, y = data.x_train[pick], data.y_train[pick]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)

    def step_loss(idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return F.cross_entropy(model(x[idx])[0], y[idx]), {}

    model.train()
    batches = (idx for _ in range(cfg.pretrain_epochs) for idx in _batches(x.shape[0], cfg.batch_size, gen))
    for _ in training_steps(batches, step_loss, opt):
        pass
    return model.eval()


def _router_kwargs(method: str, cfg: SmearConfig, max_steps: int) -> dict[str, Any]:
    if method in ("smear", "smear_2x", "ensemble", "top1"):
        return {"expert_dropout": cfg.expert_dropout}
    if method == "st_gumbel":
        start, floor = cfg.gumbel_tau
        decay = math.log(start / floor) / max(1.0, cfg.gumbel_anneal * max_steps)
        return {"tau_start": start, "tau_min": floor, "decay": decay}
    if method == "dselect":
        return {"gamma": cfg.dselect_gamma}
    if method == "latent_skills":
        return {"num_tags": len(cfg.domains)}
    return {}


def _aux_loss(method: str, outputs: Mapping[str, Any], ce_B: Tensor, weights: Mapping[str, float]) -> Tensor:
    """The method's extra training terms summed over sites: REINFORCE's policy/entropy/value terms
    (per-example loss as the reward), DSelect-k's selector entropy and unreachable-code penalty."""
    total = ce_B.new_zeros(())
    for out in outputs.values():
        terms = reinforce_terms(out.decision, ce_B) if method == "reinforce" else dict(out.aux)
        total = total + sum(weights.get(name, 0.0) * value for name, value in terms.items())
    return total


def _meta(split: ImageSplit, part: str, idx: Tensor) -> dict[str, Tensor]:
    meta = split.meta_train if part == "train" else split.meta_test
    return {"tag": meta["domain"][idx], "example_ids": meta["example_id"][idx]}


@torch.no_grad()
def evaluate(model: nn.Module, split: ImageSplit, num_domains: int, *, routing: bool = True) -> dict[str, Any]:
    """Accuracy on ``split``'s test part, overall and per domain; with ``routing``, per site the mean
    (normalised) routing weights per domain ``[domains, E]`` and the mutual information between domain
    and top expert (bits); the inference time goes under ``"seconds"``."""
    model.eval()
    domain = split.meta_test["domain"]
    n = split.x_test.shape[0]
    correct = torch.zeros(n, dtype=torch.bool)
    gates: dict[str, list[Tensor]] = {}
    seconds = 0.0
    has_adapters = hasattr(model, "moekit_adapters")
    for idx in _batches(n, 256):
        context = adapter_context(model, meta=_meta(split, "test", idx)) if has_adapters else contextlib.nullcontext({})
        with context as outs:
            start = time.perf_counter()
            logits = model(split.x_test[idx])[0]
            seconds += time.perf_counter() - start
        correct[idx] = logits.argmax(-1) == split.y_test[idx]
        for site, out in outs.items() if routing else ():
            g = out.decision.gates_TE().float()  # normalised: top-1's weight is its probability, not 1
            gates.setdefault(site, []).append(g / g.sum(-1, keepdim=True).clamp_min(1e-12))
    tables, mi = {}, {}
    for site, parts in gates.items():
        g = torch.cat(parts)
        if g.shape[1] < 2:
            continue
        table = torch.zeros(num_domains, g.shape[1], dtype=torch.float64).index_add_(0, domain, g.double())
        tables[site] = (table / torch.bincount(domain, minlength=num_domains).clamp_min(1).unsqueeze(1)).tolist()
        mi[site] = mutual_information(joint_counts(domain, g.argmax(-1), num_domains, g.shape[1])) / math.log(2)
    per_domain = [float(correct[domain == d].float().mean()) if (domain == d).any() else math.nan
                  for d in range(num_domains)]  # fmt: skip
    return {"accuracy": float(correct.float().mean()), "per_domain": per_domain, "routing": tables,
            "domain_expert_mi_bits": mi, "seconds": seconds}  # fmt: skip


def _optimizer(model: nn.Module, cfg: SmearConfig) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """Adam over the trainable parameters; Latent Skills' logits at ``skills_lr_scale`` times the rate."""
    fast = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("skill_logits")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("skill_logits")]
    groups = [{"params": rest}] + ([{"params": fast, "lr": cfg.lr * cfg.skills_lr_scale}] if fast else [])
    return torch.optim.Adam(groups, lr=cfg.lr), rest + fast


def run_method(method: str, seed: int, backbone: ResNetMoE, data: SeedData,
               cfg: SmearConfig) -> tuple[dict[str, Any], ResNetMoE]:  # fmt: skip
    """Adapters with ``method`` at every block of a copy of the frozen backbone, trained with a new head;
    the best-validation epoch is tested. Returns the run's record (times under ``"timing"``) and the model."""
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone)
    fit, D = data.fit, len(cfg.domains)
    max_steps = cfg.epochs * math.ceil(fit.x_train.shape[0] / cfg.batch_size)
    ids = [fit.meta_train["example_id"], fit.meta_test["example_id"], data.test.meta_test["example_id"]]
    experts = 2 * cfg.experts if method == "smear_2x" else cfg.experts
    insert_routed_adapters(model, BasicBlock, method="smear" if method == "smear_2x" else method,
                           num_experts=experts, bottleneck=cfg.bottleneck, num_keys=int(torch.cat(ids).max()) + 1,
                           causal=False, bank_kwargs={"activation": "silu"},
                           router_kwargs=_router_kwargs(method, cfg, max_steps))  # fmt: skip
    model.head.reset_parameters()
    model.head.requires_grad_(True)
    opt, params = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, int, dict[str, Tensor]] | None = None
    val_curve: list[float] = []

    def step_loss(idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with adapter_context(model, meta=_meta(fit, "train", idx)) as outs:
            logits = model(fit.x_train[idx])[0]
        ce = F.cross_entropy(logits, fit.y_train[idx], reduction="none")
        return ce.mean() + _aux_loss(method, outs, ce.detach(), cfg.aux_weights), {}

    def clip(step: int) -> None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)

    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.eval()  # the frozen backbone's BatchNorm statistics stay as pretrained
        model.moekit_adapters.train()
        for _ in training_steps(_batches(fit.x_train.shape[0], cfg.batch_size, gen), step_loss, opt,
                                after_backward=clip):  # fmt: skip
            pass
        val_curve.append(evaluate(model, fit, D, routing=False)["accuracy"])
        if best is None or val_curve[-1] > best[0]:
            best = (val_curve[-1], epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= cfg.patience:
            break
    train_s = time.perf_counter() - start
    assert best is not None
    model.load_state_dict(best[2])
    result = evaluate(model, data.test, D)
    seconds = result.pop("seconds")
    return {"method": method, "seed": seed, "num_experts": experts, "val_accuracy": best[0], "best_epoch": best[1] + 1,
            "val_curve": val_curve, "trainable_params": sum(p.numel() for p in params),
            "adapter_params": sum(p.numel() for p in model.moekit_adapters.parameters()),
            "sites": list(adapter_sites(model)), **result,
            TIMING_KEY: {"train_s": train_s, "infer_ms_per_1k": 1e6 * seconds / data.test.x_test.shape[0]}}, model  # fmt: skip


def run_smear(cfg: SmearConfig, out_dir: str | Path | None = None, *, progress: Progress | None = None,
              command: str | None = None, smoke_run: bool = False,
              overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run every seed and method; write ``results.json``, ``report.md`` and PNGs when ``out_dir`` is set.

    Routing tables are kept for the first seed only (for the heatmaps); every run keeps its mutual information.
    """
    progress = start_run(cfg, out_dir, overwrite=overwrite, progress=progress)
    runs, seeds, models, timing = [], [], {}, {"pretrain_s": {}, "runs": {}}
    start = time.perf_counter()
    with pinned_threads(cfg.threads), progress.task(len(cfg.seeds) * len(cfg.methods), "smear runs") as task:
        header = results_header("smear", PAPER, cfg, command=command, smoke_run=smoke_run)
        for seed in cfg.seeds:
            data = load_seed_data(cfg, seed)
            t0 = time.perf_counter()
            backbone = pretrain_backbone(cfg, data.fit, seed)
            timing["pretrain_s"][str(seed)] = time.perf_counter() - t0
            zero_shot = evaluate(backbone, data.test, len(cfg.domains), routing=False)
            seeds.append({"seed": seed, "train": data.fit.x_train.shape[0], "val": data.fit.x_test.shape[0],
                          "test": data.test.x_test.shape[0], "zero_shot_accuracy": zero_shot["accuracy"],
                          "zero_shot_per_domain": zero_shot["per_domain"]})  # fmt: skip
            for method in cfg.methods:
                run, model = run_method(method, seed, backbone, data, cfg)
                timing["runs"][f"{method}/s{seed}"] = run.pop(TIMING_KEY)
                run["name"] = f"{method}-s{seed}"
                if seed != cfg.seeds[0]:
                    run["routing"] = {}
                elif any(isinstance(m, Router) for m in model.modules()):  # routed: saved for moekit analyze
                    models[run["name"]] = model
                    run["checkpoint"] = checkpoint_entry(run["name"])
                runs.append(run)
                task.advance(note=f"{method} seed {seed}: test {run['accuracy']:.3f}")
            progress.echo(f"seed {seed}: " + ", ".join(f"{r['method']} {r['accuracy']:.3f}"
                                                        for r in runs if r["seed"] == seed))  # fmt: skip
    timing["total_s"] = time.perf_counter() - start
    first = load_seed_data(cfg, cfg.seeds[0])
    results = {
        **header,
        "methods": {m: METHODS[m] for m in cfg.methods},
        "data": {"name": "domain-digits", "domains": list(cfg.domains), "image": list(first.fit.x_train.shape[1:]),
                 "domain_entropy_bits": label_entropy(first.test.meta_test["domain"]) / math.log(2)},
        "seeds": seeds,
        "eval_set": EVAL_SET,
        "runs": runs,
        TIMING_KEY: timing,
    }  # fmt: skip
    if out_dir is not None:
        from .smear_report import write_report

        from ..analysis.target import image_eval_set

        side = first.test.image_size
        what = f"digits in {len(cfg.domains)} visual domains ({side}x{side}, split of seed {cfg.seeds[0]})"
        eval_set = image_eval_set(first.test, what, {"domain": tuple(cfg.domains)})
        with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_smear") as out:
            save_run_models(out, models, {EVAL_SET: eval_set})
            write_json(out / "results.json", results)
            write_report(results, out)
    return results
