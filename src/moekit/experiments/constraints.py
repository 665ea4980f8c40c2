"""Soft vs hard balancing constraints for MoE layers in CNNs (Pavlitska et al., https://arxiv.org/abs/2204.10598).

A CIFAR-style ResNet-18 (small width) with one stage replaced by a ResBlock-MoE (E narrow copies,
top-k = 2 per image, GAP-FC gate) is trained with each constraint at each position and E, beside the
dense network, once per seed; each seed draws a new train/test split (multi-domain digits by default:
six visual domains, a harder task than plain digits, with the domain as metadata) and a new
initialisation. Constraints:

* soft: a balancing loss added with weight ``soft_weight`` -- any registered loss
  (``importance`` = CV² of post-top-k importance, ``kl_uniform``, ``load``, ``switch``, ``z``, ``entropy``);
* hard: ``relative`` / ``mean`` importance masking (no gate noise, as in the paper's hard gates);
* ``aux_free``: bias balancing (Wang et al. 2024), and ``none``: the noisy gate alone.

Each run reports test accuracy, CV of importance and counts, living experts, entropy, NMI between
expert choice and label (and metadata), accuracy at inference k = 1..E and with each expert forced.
The first seed's models are saved (``checkpoints/<run>``, readable by ``moekit analyze``) and their
class tables, co-activation and a t-SNE of the gate logits go into the results for the plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..analysis.collect import collect_routing
from ..analysis.interventions import accuracy_vs_k, forced_expert_accuracy
from ..analysis.metrics import analyze_layer, embed_logits
from ..balancing import BALANCERS
from ..checkpoint import save_checkpoint
from ..data.cifar import load_cifar_split
from ..data.domains import load_domain_digits
from ..data.images import ImageSplit, load_digit_images
from ..models.resnet_moe import ResNetMoE
from ..progress import Progress
from ..registry import LOSSES
from ..reporting import atomic_directory, write_json
from ..training import TrainConfig, train_classifier
from .common import TIMING_KEY, pinned_threads, results_header, start_run

__all__ = ["ConstraintsConfig", "constraint_kind", "load_images", "build_model", "run_one", "run_name",
           "run_constraints"]  # fmt: skip

PAPER = "https://arxiv.org/abs/2204.10598"
DATASETS = ("digits", "domain-digits", "cifar10", "cifar100")
DEFAULT_CONSTRAINTS = ("importance", "kl_uniform", "relative", "mean")


@dataclass(frozen=True)
class ConstraintsConfig:
    """Everything a run depends on; ``quick()`` is a seconds-long smoke run for tests."""

    data: str = "domain-digits"
    data_dir: str | None = None
    image_size: int = 12
    num_train: int | None = None
    num_test: int | None = None
    width: int = 8
    positions: tuple[int, ...] = (1, 4)
    num_experts: tuple[int, ...] = (4,)
    k: int = 2
    constraints: tuple[str, ...] = DEFAULT_CONSTRAINTS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    soft_weight: float = 0.5
    tau_relative: float = 0.5
    tau_mean: float = 0.3
    bias_rate: float = 1e-2
    residual: bool = True
    expert_ratio: float = 0.39
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    tsne_points: int = 500
    metadata: tuple[str, ...] = ("domain", "superclass")
    threads: int = 1

    @classmethod
    def quick(cls) -> ConstraintsConfig:
        return cls(image_size=8, num_train=192, num_test=96, width=4, positions=(4,), num_experts=(4,),
                   seeds=(0,), epochs=1, tsne_points=40)  # fmt: skip

    def check(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {list(DATASETS)}, got {self.data!r}")
        if self.data.startswith("cifar") and not self.data_dir:
            raise ValueError(f"data={self.data!r} needs data_dir (a directory with the CIFAR binary files)")
        for p in self.positions:
            if p not in (1, 2, 3, 4):
                raise ValueError(f"positions must be in 1..4, got {p}")
        for E in self.num_experts:
            if not self.k <= E:
                raise ValueError(f"k must be <= num_experts, got k={self.k} with num_experts={E}")
        for name in self.constraints:
            constraint_kind(name)
        for name in ("tau_relative", "tau_mean", "bias_rate", "soft_weight", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.epochs < 1 or self.threads < 1 or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need epochs >= 1, threads >= 1 and distinct seeds, got epochs={self.epochs}, "
                             f"threads={self.threads}, seeds={self.seeds}")  # fmt: skip


def constraint_kind(name: str) -> str:
    """``"soft"`` (a registered loss), ``"hard"``/``"bias"`` (a balancer) or ``"none"``; ValueError otherwise."""
    if name == "none":
        return "none"
    if name in BALANCERS:
        return "bias" if name == "aux_free" else "hard"
    if name in LOSSES:
        return "soft"
    raise ValueError(f"unknown constraint {name!r}; use 'none', a balancer ({', '.join(BALANCERS)}) "
                     f"or a loss ({', '.join(LOSSES.names())})")  # fmt: skip


def load_images(cfg: ConstraintsConfig, seed: int = 0) -> ImageSplit:
    """The seed's split (CIFAR has one fixed split: there the seed changes only the subset)."""
    if cfg.data == "digits":
        data = load_digit_images(size=cfg.image_size, seed=seed)
    elif cfg.data == "domain-digits":
        data = load_domain_digits(size=cfg.image_size, seed=seed)
    else:
        data = load_cifar_split(cfg.data_dir, cfg.data)  # type: ignore[arg-type]
    return data.subset(cfg.num_train, cfg.num_test, seed=seed)


def build_model(cfg: ConstraintsConfig, data: ImageSplit, constraint: str | None, position: int | None,
                num_experts: int) -> ResNetMoE:  # fmt: skip
    """The dense network (``constraint=None``) or the MoE network with one constraint."""
    common = {"in_channels": data.channels, "width": cfg.width}
    if constraint is None:
        return ResNetMoE(data.num_classes, **common)
    kind = constraint_kind(constraint)
    balancer = constraint if kind in ("hard", "bias") else None
    kwargs = {"relative": {"tau": cfg.tau_relative}, "mean": {"tau": cfg.tau_mean},
              "aux_free": {"rate": cfg.bias_rate}}.get(constraint, {})  # fmt: skip
    return ResNetMoE(data.num_classes, **common, moe_position=position, num_experts=num_experts, k=cfg.k,
                     residual=cfg.residual, expert_ratio=cfg.expert_ratio, noisy=kind in ("soft", "none"),
                     balancer=balancer, balancer_kwargs=kwargs)  # fmt: skip


def _accuracy(x: Tensor, y: Tensor, batch_size: int = 256) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        correct = sum(int((model(x[i : i + batch_size])[0].argmax(-1) == y[i : i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))  # fmt: skip
        return correct / len(y)

    return evaluate


def run_one(cfg: ConstraintsConfig, data: ImageSplit, *, constraint: str | None, position: int | None,
            num_experts: int, seed: int, keep_plots: bool = False, tsne: bool = False
            ) -> tuple[dict[str, Any], nn.Module]:  # fmt: skip
    """Train and analyse one model; returns (its record, the model). With ``keep_plots`` the record holds
    ``"plots"``: class table and co-activation (and a t-SNE of the gate logits when ``tsne``)."""
    torch.manual_seed(seed)
    model = build_model(cfg, data, constraint, position, num_experts)
    aux = {constraint: cfg.soft_weight} if constraint is not None and constraint_kind(constraint) == "soft" else {}
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, aux_weights=aux, seed=seed)
    start = time.perf_counter()
    train_classifier(model, (data.x_train, data.y_train), **train_cfg.kwargs(), progress=False)
    result: dict[str, Any] = {
        "constraint": constraint or "dense", "kind": constraint_kind(constraint) if constraint else "dense",
        "position": position, "num_experts": num_experts, "seed": seed,
        TIMING_KEY: {"train_s": time.perf_counter() - start},
    }  # fmt: skip
    evaluate = _accuracy(data.x_test, data.y_test)
    result["accuracy"] = evaluate(model)
    if constraint is None:
        return result, model
    batches = [(data.x_test[i : i + 256], data.y_test[i : i + 256], i) for i in range(0, len(data.y_test), 256)]
    keys = [k for k in cfg.metadata if k in data.meta_test]  # categorical metadata for mutual information
    meta = (lambda b: {k: data.meta_test[k][b[2] : b[2] + len(b[1])] for k in keys}) if keys else None
    record = collect_routing(model, batches, labels=lambda b: b[1], metadata=meta, max_tokens=len(data.y_test))
    ((layer_name, layer),) = record.layers.items()
    analysis = analyze_layer(layer, num_labels=data.num_classes)
    result.update(
        layer=layer_name, cv_importance=analysis.cv_importance, cv_counts=analysis.cv_counts,
        entropy=analysis.entropy, living_experts=analysis.living_experts, mean_gate=analysis.mean_gate.tolist(),
        nmi={k: v["nmi"] for k, v in analysis.mutual_info.items()},
        accuracy_vs_k={str(k): v for k, v in accuracy_vs_k(model, evaluate, range(1, num_experts + 1)).items()},
        forced_expert_accuracy=forced_expert_accuracy(model, evaluate, layer=layer_name),
    )  # fmt: skip
    if keep_plots:
        plots: dict[str, Any] = {"coactivation": analysis.coactivation.tolist(),
                                 "class_table": None if analysis.class_table is None else analysis.class_table.tolist()}
        if tsne and cfg.tsne_points >= 5 and layer.logits_TE is not None:
            embedding = embed_logits(layer.logits_TE, max_points=cfg.tsne_points, seed=seed)
            plots["tsne"] = [[round(float(a), 4), round(float(b), 4)] for a, b in embedding.tolist()]
            plots["tsne_labels"] = None if layer.labels_T is None else layer.labels_T[: len(embedding)].tolist()
        result["plots"] = plots
    return result, model


def run_name(result: dict[str, Any]) -> str:
    if result["constraint"] == "dense":
        return f"dense-s{result['seed']}"
    return f"p{result['position']}-E{result['num_experts']}-{result['constraint']}-s{result['seed']}"


def run_constraints(cfg: ConstraintsConfig, out_dir: str | Path | None = None, *, progress: Progress | None = None,
                    command: str | None = None, smoke_run: bool = False,
                    overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run the grid for every seed; with ``out_dir``, write ``results.json``, ``report.md``, PNGs and the
    first seed's checkpoints there (built aside and renamed into place)."""
    progress = start_run(cfg, out_dir, overwrite=overwrite, progress=progress)
    grid: list[tuple[str | None, int | None, int]] = [(None, None, 0)]
    grid += [(c, p, E) for p in cfg.positions for E in cfg.num_experts for c in cfg.constraints]
    runs, models, timing = [], {}, {"runs": {}}
    shown = (cfg.positions[-1], cfg.num_experts[0])  # the configuration the specialisation plots show
    start = time.perf_counter()
    with pinned_threads(cfg.threads), progress.task(len(grid) * len(cfg.seeds), "constraints runs") as task:
        header = results_header("constraints", PAPER, cfg, command=command, smoke_run=smoke_run)
        for seed in cfg.seeds:
            data = load_images(cfg, seed)
            for constraint, position, E in grid:
                first = seed == cfg.seeds[0]
                result, model = run_one(cfg, data, constraint=constraint, position=position, num_experts=E,
                                        seed=seed, keep_plots=first, tsne=first and (position, E) == shown)  # fmt: skip
                result["name"] = run_name(result)
                timing["runs"][result["name"]] = result.pop(TIMING_KEY)
                if first:
                    models[result["name"]] = model
                    result["checkpoint"] = f"checkpoints/{result['name']}"
                runs.append(result)
                task.advance(note=f"{result['name']} acc {result['accuracy']:.3f}")
                progress.echo(f"{result['name']:<28} acc {result['accuracy']:.3f}  "
                              f"CV imp {result.get('cv_importance', float('nan')):.2f}  "
                              f"living {result.get('living_experts', '-')}")  # fmt: skip
    timing["total_s"] = time.perf_counter() - start
    results = {
        **header,
        "data": {"name": data.name, "channels": data.channels, "image_size": data.image_size,
                 "num_classes": data.num_classes, "num_train": len(data.y_train), "num_test": len(data.y_test),
                 "class_names": list(data.class_names)},
        "runs": runs,
        TIMING_KEY: timing,
    }  # fmt: skip
    if out_dir is not None:
        from .constraints_report import write_report

        with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_constraints") as stage:
            for name, model in models.items():
                save_checkpoint(model, stage / "checkpoints" / name)
            write_json(stage / "results.json", results)
            write_report(results, stage)
    return results
