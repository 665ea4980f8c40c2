"""``moekit demo``: MoE classifiers with several routers and balancing losses on embedded digits.

For every seed (a new train/test split and initialisation) one small model per configuration is
trained; the report gives test accuracy, balance (CV of importance and of counts), living experts and
time, each as a mean with a 95% interval over seeds, every configuration's accuracy paired against the
dense softmax gate, and a plot of how each configuration uses its experts. ``run_demo(cfg)`` returns
the results dict and writes ``report.md``, ``results.json`` and PNGs when given a directory, with the
first seed's models (``checkpoints/<run>``) and test digits (``eval_set.safetensors``) for ``moekit analyze``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..data.digits import DigitsSplit, load_digits_split
from ..models.classifier import MoEClassifier
from ..progress import Progress
from ..reporting import atomic_directory, write_json
from ..stats import RoutingRecorder
from ..training import TrainConfig, evaluate_classifier, train_classifier
from .common import (TIMING_KEY, checkpoint_entry, pinned_threads, results_header, run_slug, save_run_models,
                     start_run)

__all__ = ["DemoRun", "DEMO_RUNS", "DemoConfig", "select_runs", "run_demo"]


@dataclass(frozen=True)
class DemoRun:
    """One configuration: a label, a router by registry name with its kwargs, aux-loss coefficients
    (loss name -> coefficient) and whether the router gets an aux-loss-free bias balancer."""

    label: str
    router: str
    router_kwargs: Mapping[str, Any] = field(default_factory=dict)
    aux_weights: Mapping[str, float] = field(default_factory=dict)
    aux_free_bias: bool = False
    note: str = ""


DEMO_RUNS: tuple[DemoRun, ...] = (
    DemoRun("softmax (dense)", "softmax", note="every expert on every example; the accuracy reference"),
    DemoRun("top-2, no balancing", "topk", {"k": 2}, note="noisy top-2 (Shazeer 2017) without any balancing"),
    DemoRun("top-2 + importance + load", "topk", {"k": 2}, {"importance": 0.1, "load": 0.1},
            note="Shazeer's importance CV² and smooth load CV² losses"),
    DemoRun("top-2 + aux-free bias", "topk", {"k": 2, "noisy": False}, aux_free_bias=True,
            note="selection-only per-expert bias, updated outside autograd (Wang et al. 2024)"),
    DemoRun("switch + aux + z", "switch", {"capacity_factor": None}, {"switch": 0.01, "z": 1e-3},
            note="Switch top-1 with the Switch aux loss and the ST-MoE router z-loss"),
    DemoRun("expert choice", "expert_choice", {"capacity_factor": 2.0},
            note="each expert takes its top-C examples of the batch (balanced by construction)"),
    DemoRun("hash (example id)", "hash", {"k": 1}, note="fixed random expert per example id: balanced, but blind"),
)  # fmt: skip

#: the first seed's test digits (with the example ids hash routing reads), for moekit analyze
EVAL_SET = "eval_set.safetensors"
#: test examples per forward (expert choice routing depends on the batch); recorded for moekit analyze
EVAL_BATCH = 512
#: the configuration every other one is compared with
REFERENCE = DEMO_RUNS[0].label


@dataclass(frozen=True)
class DemoConfig:
    """Everything a demo run depends on. ``routers``: router names to run (empty: every configuration)."""

    routers: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 20
    num_experts: int = 8
    dim: int = 64
    batch_size: int = 64
    lr: float = 3e-3
    threads: int = 1

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(seeds=(0,), epochs=2)

    def check(self) -> None:
        select_runs(self.routers)
        for name, low in (("epochs", 1), ("num_experts", 2), ("dim", 1), ("batch_size", 1), ("threads", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct (at least one), got {self.seeds}")


def select_runs(routers: tuple[str, ...] | list[str] | None) -> list[DemoRun]:
    """The configurations whose router is in ``routers`` (all when empty); unknown names are an error."""
    known = sorted({r.router for r in DEMO_RUNS})
    unknown = [r for r in routers or [] if r not in known]
    if unknown:
        raise ValueError(f"routers has unknown names {unknown}; the demo runs {known}")
    return [r for r in DEMO_RUNS if not routers or r.router in routers]


def _build(run: DemoRun, data: DigitsSplit, cfg: DemoConfig) -> MoEClassifier:
    kwargs = dict(run.router_kwargs)
    if run.router == "hash":
        kwargs["num_keys"] = data.x_train.shape[0] + data.x_test.shape[0]
    balancer = {"balancer": "aux_free", "balancer_kwargs": {"rate": 1e-2}} if run.aux_free_bias else {}
    return MoEClassifier(data.num_features, 10, dim=cfg.dim, num_experts=cfg.num_experts, router=run.router,
                         router_kwargs=kwargs, **balancer)  # fmt: skip  (by name: the checkpoint config rebuilds it)


def _meta_fns(data: DigitsSplit) -> tuple[Callable, Callable]:
    """Hash keys = example ids: train examples are ``0..n_train-1``, test examples follow."""
    n_train = data.x_train.shape[0]
    return (lambda idx: {"token_ids": idx}), (lambda idx: {"token_ids": idx + n_train})


def run_demo(cfg: DemoConfig, out_dir: str | Path | None = None, *, progress: Progress | None = None,
             command: str | None = None, smoke_run: bool = False,
             overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train every selected configuration for every seed; write the report files when ``out_dir`` is set."""
    progress = start_run(cfg, out_dir, overwrite=overwrite, progress=progress)
    configurations = select_runs(cfg.routers)
    runs, models, timing = [], {}, {"runs": {}}
    start = time.perf_counter()
    with pinned_threads(cfg.threads), progress.task(len(cfg.seeds) * len(configurations), "demo runs") as task:
        header = results_header("demo", "", cfg, command=command, smoke_run=smoke_run)
        for seed in cfg.seeds:
            data = load_digits_split(seed=seed)
            train_meta, test_meta = _meta_fns(data)
            train = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed).kwargs()
            del train["aux_weights"]  # per configuration
            for conf in configurations:
                torch.manual_seed(seed)
                model = _build(conf, data, cfg)
                history = train_classifier(model, (data.x_train, data.y_train), aux_weights=conf.aux_weights,
                                           meta_fn=train_meta, progress=False, **train)  # fmt: skip
                with RoutingRecorder(model) as rec:
                    acc, _ = evaluate_classifier(model, data.x_test, data.y_test, meta_fn=test_meta,
                                                 batch_size=EVAL_BATCH)  # fmt: skip
                metrics = rec.metrics()["blocks.0.router"].as_dict()
                timing["runs"][f"{conf.label}/s{seed}"] = {"train_s": sum(e.pop("seconds") for e in history)}
                run = {"name": f"{run_slug(conf.label)}-s{seed}", "label": conf.label, "router": conf.router,
                       "seed": seed, "accuracy": acc, "final_train_loss": history[-1]["loss"], "history": history,
                       **{k: v for k, v in metrics.items() if k != "coactivation"}}  # fmt: skip
                if seed == cfg.seeds[0]:  # saved for moekit analyze
                    models[run["name"]] = model
                    run["checkpoint"] = checkpoint_entry(run["name"])
                runs.append(run)
                task.advance(note=f"{conf.label} seed {seed}: acc {acc:.3f}")
                progress.echo(f"seed {seed} {conf.label:<27} acc {acc:.3f}  CV(counts) {metrics['cv_counts']:.2f}  "
                              f"living {metrics['living_experts']}/{cfg.num_experts}")  # fmt: skip
    timing["total_s"] = time.perf_counter() - start
    results = {
        **header,
        "configurations": [asdict(c) for c in configurations],
        "data": {"name": "sklearn digits", "train": len(data.y_train), "test": len(data.y_test)},
        "eval_set": EVAL_SET,
        "eval_batch_size": EVAL_BATCH,
        "runs": runs,
        TIMING_KEY: timing,
    }
    if out_dir is not None:
        from .demo_report import write_report

        from ..analysis.target import builtin_eval_set

        with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_demo") as out:
            save_run_models(out, models, {EVAL_SET: builtin_eval_set("digits-flat", seed=cfg.seeds[0])})
            write_json(out / "results.json", results)
            write_report(results, out)
    return results
