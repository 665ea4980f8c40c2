"""``moekit reproduce constraints``: soft vs hard balancing constraints for MoE layers in CNNs
(Pavlitska et al., https://arxiv.org/abs/2204.10598).

A CIFAR-style ResNet-18 (small width) with one stage replaced by a ResBlock-MoE (E narrow copies,
top-k = 2 per image, GAP-FC gate) is trained with each constraint at several positions, E values
and seeds, beside the dense network:

* soft: a balancing loss added with weight ``soft_weight`` -- any registered loss
  (``importance`` = CV² of post-top-k importance, ``kl_uniform``, ``load``, ``switch``, ``z``, ``entropy``);
* hard: ``relative`` / ``mean`` importance masking (no gate noise, as in the paper's hard gates);
* ``aux_free``: bias balancing (Wang et al. 2024), and ``none``: the noisy gate alone.

Each run reports test accuracy, CV of importance and counts, living experts, entropy, NMI between
expert choice and label (and metadata), accuracy at inference k = 1..E and with each expert forced.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..analysis.collect import collect_routing
from ..analysis.interventions import accuracy_vs_k, forced_expert_accuracy
from ..analysis.metrics import analyze_layer, embed_logits
from ..balancing import BALANCERS
from ..checkpoint import save_checkpoint
from ..data.cifar import load_cifar_split
from ..data.domains import load_domain_digits
from ..data.images import ImageSplit, load_digit_images
from ..models.resnet_moe import ResNetMoE
from ..registry import LOSSES
from ..reporting import check_report_dir, report_directory
from ..training import TrainConfig, train_classifier

__all__ = [
    "ConstraintsConfig",
    "constraint_kind",
    "load_images",
    "build_model",
    "run_one",
    "run_constraints",
    "add_reproduce_parser",
]

DATASETS = ("digits", "domain-digits", "cifar10", "cifar100")
DEFAULT_CONSTRAINTS = ("importance", "kl_uniform", "relative", "mean", "aux_free")


@dataclass(frozen=True)
class ConstraintsConfig:
    """Everything a run depends on; ``quick()`` is a seconds-long smoke run for tests."""

    data: str = "digits"
    data_dir: str | None = None
    image_size: int = 12
    num_train: int | None = None
    num_test: int | None = None
    width: int = 8
    positions: tuple[int, ...] = (1, 4)
    num_experts: tuple[int, ...] = (4, 10)
    k: int = 2
    constraints: tuple[str, ...] = DEFAULT_CONSTRAINTS
    seeds: tuple[int, ...] = (0, 1, 2)
    soft_weight: float = 0.5
    tau_relative: float = 0.5
    tau_mean: float = 0.3
    bias_rate: float = 1e-2
    residual: bool = True
    expert_ratio: float = 0.39
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    tsne_points: int = 600
    metadata: tuple[str, ...] = ("domain", "superclass")

    @classmethod
    def quick(cls) -> ConstraintsConfig:
        return cls(
            image_size=8,
            num_train=192,
            num_test=96,
            width=4,
            positions=(4,),
            num_experts=(4,),
            seeds=(0,),
            epochs=1,
            tsne_points=40,
        )


def constraint_kind(name: str) -> str:
    """``"soft"`` (a registered loss), ``"hard"``/``"bias"`` (a balancer) or ``"none"``; ValueError otherwise."""
    if name == "none":
        return "none"
    if name in BALANCERS:
        return "bias" if name == "aux_free" else "hard"
    if name in LOSSES:
        return "soft"
    raise ValueError(
        f"unknown constraint {name!r}; use 'none', a balancer ({', '.join(BALANCERS)}) "
        f"or a loss ({', '.join(LOSSES.names())})"
    )


def _check(cfg: ConstraintsConfig) -> None:
    if cfg.data not in DATASETS:
        raise ValueError(f"data must be one of {list(DATASETS)}, got {cfg.data!r}")
    if cfg.data.startswith("cifar") and not cfg.data_dir:
        raise ValueError(f"data={cfg.data!r} needs data_dir (a directory with the CIFAR binary files)")
    for p in cfg.positions:
        if p not in (1, 2, 3, 4):
            raise ValueError(f"positions must be in 1..4, got {p}")
    for E in cfg.num_experts:
        if not cfg.k <= E:
            raise ValueError(f"k must be <= num_experts, got k={cfg.k} with num_experts={E}")
    for name in cfg.constraints:
        constraint_kind(name)
    for name in ("tau_relative", "tau_mean", "bias_rate", "soft_weight", "lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.epochs < 1 or not cfg.seeds:
        raise ValueError(f"need epochs >= 1 and at least one seed, got epochs={cfg.epochs}, seeds={cfg.seeds}")


def load_images(cfg: ConstraintsConfig) -> ImageSplit:
    if cfg.data == "digits":
        data = load_digit_images(size=cfg.image_size)
    elif cfg.data == "domain-digits":
        data = load_domain_digits(size=cfg.image_size)
    else:
        data = load_cifar_split(cfg.data_dir, cfg.data)  # type: ignore[arg-type]
    return data.subset(cfg.num_train, cfg.num_test)


def build_model(
    cfg: ConstraintsConfig, data: ImageSplit, constraint: str | None, position: int | None, num_experts: int
) -> ResNetMoE:
    """The dense network (``constraint=None``) or the MoE network with one constraint."""
    common = {"in_channels": data.channels, "width": cfg.width}
    if constraint is None:
        return ResNetMoE(data.num_classes, **common)
    kind = constraint_kind(constraint)
    balancer, kwargs = (constraint, {}) if kind in ("hard", "bias") else (None, {})
    if constraint == "relative":
        kwargs = {"tau": cfg.tau_relative}
    elif constraint == "mean":
        kwargs = {"tau": cfg.tau_mean}
    elif constraint == "aux_free":
        kwargs = {"rate": cfg.bias_rate}
    return ResNetMoE(
        data.num_classes,
        **common,
        moe_position=position,
        num_experts=num_experts,
        k=cfg.k,
        residual=cfg.residual,
        expert_ratio=cfg.expert_ratio,
        noisy=kind in ("soft", "none"),
        balancer=balancer,
        balancer_kwargs=kwargs,
    )


def _accuracy(x: Tensor, y: Tensor, batch_size: int = 256) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        correct = sum(
            int((model(x[i : i + batch_size])[0].argmax(-1) == y[i : i + batch_size]).sum())
            for i in range(0, len(y), batch_size)
        )
        return correct / len(y)

    return evaluate


def run_one(
    cfg: ConstraintsConfig,
    data: ImageSplit,
    *,
    constraint: str | None,
    position: int | None,
    num_experts: int,
    seed: int,
    progress: bool = False,
    keep_routing: bool = False,
    tsne: bool = False,
) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """Train and analyse one model; returns (metrics, model, routing tables kept for plots when
    ``keep_routing``, with a t-SNE of the gate logits when ``tsne``)."""
    torch.manual_seed(seed)
    model = build_model(cfg, data, constraint, position, num_experts)
    aux = {constraint: cfg.soft_weight} if constraint is not None and constraint_kind(constraint) == "soft" else {}
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, aux_weights=aux, seed=seed)
    start = time.perf_counter()
    train_classifier(model, (data.x_train, data.y_train), **train_cfg.kwargs(), progress=progress,
                     desc=constraint or "dense")
    result: dict[str, Any] = {
        "constraint": constraint or "dense",
        "kind": constraint_kind(constraint) if constraint else "dense",
        "position": position,
        "num_experts": num_experts,
        "seed": seed,
        "train_seconds": time.perf_counter() - start,
    }
    evaluate = _accuracy(data.x_test, data.y_test)
    result["accuracy"] = evaluate(model)
    extra: dict[str, Any] = {}
    if constraint is None:
        return result, model, extra
    batches = [(data.x_test[i : i + 256], data.y_test[i : i + 256], i) for i in range(0, len(data.y_test), 256)]
    keys = [k for k in cfg.metadata if k in data.meta_test]  # categorical metadata for mutual information
    meta = (lambda b: {k: data.meta_test[k][b[2] : b[2] + len(b[1])] for k in keys}) if keys else None
    record = collect_routing(model, batches, labels=lambda b: b[1], metadata=meta, max_tokens=len(data.y_test))
    ((layer_name, layer),) = record.layers.items()
    analysis = analyze_layer(layer, num_labels=data.num_classes)
    result.update(
        layer=layer_name,
        cv_importance=analysis.cv_importance,
        cv_counts=analysis.cv_counts,
        entropy=analysis.entropy,
        living_experts=analysis.living_experts,
        mean_gate=analysis.mean_gate.tolist(),
        nmi={k: v["nmi"] for k, v in analysis.mutual_info.items()},
        accuracy_vs_k={str(k): v for k, v in accuracy_vs_k(model, evaluate, range(1, num_experts + 1)).items()},
        forced_expert_accuracy=forced_expert_accuracy(model, evaluate, layer=layer_name),
    )
    if keep_routing:
        extra = {"class_table": analysis.class_table, "coactivation": analysis.coactivation}
        if tsne and cfg.tsne_points >= 5 and layer.logits_TE is not None:
            extra["tsne"] = embed_logits(layer.logits_TE, max_points=cfg.tsne_points, seed=seed)
            extra["tsne_labels"] = layer.labels_T[: extra["tsne"].shape[0]] if layer.labels_T is not None else None
    return result, model, extra


def run_name(result: dict[str, Any]) -> str:
    if result["constraint"] == "dense":
        return f"dense-s{result['seed']}"
    return f"p{result['position']}-E{result['num_experts']}-{result['constraint']}-s{result['seed']}"


def run_constraints(
    cfg: ConstraintsConfig, out_dir: str | Path, *, quiet: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the grid and write ``report.md``, ``results.json``, PNGs and the first seed's checkpoints
    (``checkpoints/<run>``, readable by ``moekit analyze``) into ``out_dir``. The directory is built
    aside and renamed into place; an existing ``out_dir`` is replaced only if it holds an earlier run."""
    from .constraints_report import write_constraints_report

    _check(cfg)
    out = check_report_dir(out_dir)
    data = load_images(cfg)
    grid: list[tuple[str | None, int | None, int]] = [(None, None, 0)]
    grid += [(c, p, E) for p in cfg.positions for E in cfg.num_experts for c in cfg.constraints]
    runs, extras, models = [], {}, {}
    bar = tqdm(
        total=len(grid) * len(cfg.seeds), desc="constraints", disable=quiet or not sys.stderr.isatty(), leave=False
    )
    for seed in cfg.seeds:
        for constraint, position, E in grid:
            keep = seed == cfg.seeds[0]
            tsne = keep and position == cfg.positions[-1] and E == cfg.num_experts[0]  # the configs the report shows
            result, model, extra = run_one(
                cfg,
                data,
                constraint=constraint,
                position=position,
                num_experts=E,
                seed=seed,
                keep_routing=keep,
                tsne=tsne,
            )
            result["name"] = run_name(result)
            if keep:
                models[result["name"]] = model
                result["checkpoint"] = f"checkpoints/{result['name']}"
                extras[result["name"]] = extra
            runs.append(result)
            bar.update()
            if not quiet:
                echo(
                    f"{result['name']:<28} acc {result['accuracy']:.3f}  "
                    f"CV imp {result.get('cv_importance', float('nan')):.2f}  "
                    f"living {result.get('living_experts', '-')}  {result['train_seconds']:.1f}s"
                )
    bar.close()
    data_info = {
        "name": data.name,
        "channels": data.channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
        "num_train": len(data.y_train),
        "num_test": len(data.y_test),
        "class_names": list(data.class_names),
    }
    with report_directory(out) as stage:
        for name, model in models.items():
            save_checkpoint(model, stage / "checkpoints" / name)
        write_constraints_report(stage, cfg_dict(cfg), data_info, runs, extras)
    return {"runs": runs, "data": data_info}


def cfg_dict(cfg: ConstraintsConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _ints(name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def add_reproduce_parser(subparsers: Any) -> None:
    d = ConstraintsConfig()
    p = subparsers.add_parser(
        "constraints", help="soft vs hard balancing constraints for MoE layers in CNNs (Pavlitska et al.)"
    )
    p.add_argument("--out", default="moekit-runs/constraints", help="output directory (default: %(default)s)")
    p.add_argument("--data", default=d.data, choices=DATASETS)
    p.add_argument(
        "--data-dir", default=None, help="directory with the CIFAR binary files (for --data cifar10/cifar100)"
    )
    p.add_argument(
        "--image-size", type=int, default=d.image_size, help="digits: upscaled image size (default: %(default)s)"
    )
    p.add_argument(
        "--width", type=int, default=d.width, help="ResNet-18 width, 64 = the original (default: %(default)s)"
    )
    p.add_argument(
        "--positions",
        default=_join(d.positions),
        help="comma-separated MoE positions, stages 1-4 (default: %(default)s)",
    )
    p.add_argument(
        "--experts", default=_join(d.num_experts), help="comma-separated numbers of experts (default: %(default)s)"
    )
    p.add_argument(
        "--constraints",
        default=_join(d.constraints),
        help="comma-separated: losses, balancers or none (default: %(default)s)",
    )
    p.add_argument("--seeds", default=_join(d.seeds), help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--num-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (ignores the other options)")
    p.set_defaults(func=_run)


def _join(values: tuple[Any, ...]) -> str:
    return ",".join(str(v) for v in values)


def _run(args: argparse.Namespace) -> int:
    if args.quick:
        cfg = ConstraintsConfig.quick()
    else:
        cfg = ConstraintsConfig(
            data=args.data,
            data_dir=args.data_dir,
            image_size=args.image_size,
            width=args.width,
            positions=_ints("--positions", args.positions),
            num_experts=_ints("--experts", args.experts),
            constraints=tuple(c.strip() for c in args.constraints.split(",") if c.strip()),
            seeds=_ints("--seeds", args.seeds),
            epochs=args.epochs,
            batch_size=args.batch_size,
            num_train=args.num_train,
            num_test=args.num_test,
        )
    run_constraints(cfg, args.out)
    print(f"report written to {args.out}/report.md")
    return 0
