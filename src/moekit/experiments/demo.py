"""``moekit demo``: MoE classifiers with several routers and balancing losses on embedded digits.

Trains one small model per configuration (same data split, same initial seed), then reports test
accuracy, balance (CV of importance and of counts), living experts and time, with a plot of how
each configuration uses its experts. Writes ``report.md``, ``results.json`` and ``utilisation.png``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .._checks import check_int
from ..balancing import AuxFreeBias
from ..data.digits import DigitsSplit, load_digits_split
from ..models.classifier import MoEClassifier
from ..reporting import (
    atomic_write_text,
    check_report_dir,
    environment,
    markdown_table,
    report_directory,
    save_figure,
    write_json,
)
from ..stats import RoutingRecorder
from ..training import TrainConfig, evaluate_classifier, train_classifier

__all__ = ["DemoRun", "DEMO_RUNS", "run_demo"]


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
)


def _build(run: DemoRun, data: DigitsSplit, num_experts: int, dim: int) -> MoEClassifier:
    kwargs = dict(run.router_kwargs)
    if run.router == "hash":
        kwargs["num_keys"] = data.x_train.shape[0] + data.x_test.shape[0]
    if run.aux_free_bias:
        kwargs["balancer"] = AuxFreeBias(num_experts, rate=1e-2)
    return MoEClassifier(data.num_features, 10, dim=dim, num_experts=num_experts, router=run.router, router_kwargs=kwargs)


def _meta_fns(data: DigitsSplit) -> tuple[Callable, Callable]:
    """Hash keys = example ids: train examples are ``0..n_train-1``, test examples follow."""
    n_train = data.x_train.shape[0]
    return (lambda idx: {"token_ids": idx}), (lambda idx: {"token_ids": idx + n_train})


def select_runs(routers: Sequence[str] | None) -> list[DemoRun]:
    """The configurations whose router is in ``routers`` (all when None); unknown names are an error."""
    known = sorted({r.router for r in DEMO_RUNS})
    unknown = [r for r in routers or [] if r not in known]
    if unknown:
        raise ValueError(f"--routers has unknown names {unknown}; the demo runs {known}")
    return [r for r in DEMO_RUNS if not routers or r.router in routers]


def run_demo(
    out_dir: str | Path,
    *,
    routers: Sequence[str] | None = None,
    epochs: int = 30,
    num_experts: int = 8,
    dim: int = 64,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every selected configuration and write the report files into ``out_dir``."""
    out = check_report_dir(out_dir)
    runs = select_runs(routers)
    check_int("epochs", epochs, low=1)
    check_int("num_experts", num_experts, low=2)
    data = load_digits_split(seed=seed)
    train_meta, test_meta = _meta_fns(data)
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed).kwargs()
    del train["aux_weights"]  # per configuration
    results = []
    for run in runs:
        torch.manual_seed(seed)
        model = _build(run, data, num_experts, dim)
        start = time.perf_counter()
        history = train_classifier(model, (data.x_train, data.y_train), aux_weights=run.aux_weights, meta_fn=train_meta,
                                   progress=progress, desc=run.label, **train)
        train_time = time.perf_counter() - start
        with RoutingRecorder(model) as rec:
            acc, _ = evaluate_classifier(model, data.x_test, data.y_test, meta_fn=test_meta)
        metrics = rec.metrics()["blocks.0.router"]
        results.append({"label": run.label, "router": run.router, "accuracy": acc, "train_seconds": train_time,
                        "final_train_loss": history[-1]["loss"], "history": history,
                        **{k: v for k, v in metrics.as_dict().items() if k != "coactivation"}})
        echo(f"{run.label:<27} acc {acc:.3f}  CV(counts) {metrics.cv_counts:.2f}  "
             f"living {metrics.living_experts}/{num_experts}  {train_time:.1f}s")
    config = {"runs": [_describe(r) for r in runs], "num_experts": num_experts, "dim": dim, "experts": "mlp",
              "data": {"name": "sklearn digits", "train": len(data.y_train), "test": len(data.y_test)}, **train}
    _write_outputs(out, results, config)
    echo("\n" + _table(results, num_experts))
    return {"config": config, "results": results}


def _describe(run: DemoRun) -> dict[str, Any]:
    return {k: v for k, v in asdict(run).items() if k != "note"}


def _table(results: list[dict[str, Any]], num_experts: int) -> str:
    rows = [[r["label"], r["accuracy"], r["cv_importance"], r["cv_counts"], f"{r['living_experts']}/{num_experts}",
             f"{r['train_seconds']:.1f}"] for r in results]
    return markdown_table(["configuration", "test accuracy", "CV importance", "CV counts", "living experts", "train s"],
                          rows, floatfmt=".3f")


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = torch.tensor([r["tokens_per_expert"] for r in results], dtype=torch.float64)
    shares = shares / shares.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * shares.shape[1], 0.9 + 0.45 * len(results)))
    image = ax.imshow(shares.numpy(), cmap="viridis", aspect="auto", vmin=0)
    ax.set_yticks(range(len(results)), [r["label"] for r in results])
    ax.set_xticks(range(shares.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(f"share of test-set routing slots per expert (uniform = 1/{shares.shape[1]})")
    for i in range(shares.shape[0]):
        for j in range(shares.shape[1]):
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if shares[i, j] > 0.6 * float(shares.max()) else "white")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def _findings(results: list[dict[str, Any]], num_experts: int) -> str:
    """Sentences computed from this run's numbers (nothing here is hard-coded)."""
    best = max(results, key=lambda r: r["accuracy"])
    balanced = min(results, key=lambda r: r["cv_importance"])
    lines = [f"- Best test accuracy: **{best['label']}** ({best['accuracy']:.3f}).",
             f"- Most even gate mass over experts (lowest CV of importance): **{balanced['label']}** "
             f"({balanced['cv_importance']:.3f}). (CV of counts is 0 by construction for the dense softmax gate, "
             "where every expert serves every example, and for expert choice, where each expert takes exactly C.)"]
    starved = [f"{r['label']} ({r['living_experts']}/{num_experts})" for r in results if r["living_experts"] < num_experts]
    lines.append("- Configurations that left experts unused on the test set: " + (", ".join(starved) if starved else "none") + ".")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, results: list[dict[str, Any]], config: dict[str, Any]) -> None:
    E = config["num_experts"]
    notes = "\n".join(f"- **{r.label}** -- {r.note}." for r in DEMO_RUNS if r.label in {x["label"] for x in results})
    report = (
        "# moekit demo: routers and balancing losses on scikit-learn digits\n\n"
        f"Each model: a linear embedding (64 -> {config['dim']}), one residual MoE block with {E} MLP experts, "
        f"and a linear head; trained {config['epochs']} epochs with AdamW (lr {config['lr']}, batch "
        f"{config['batch_size']}) on {config['data']['train']} of the 1797 digits; metrics on the held-out "
        f"{config['data']['test']}. Same split and same initial seed ({config['seed']}) for every configuration.\n\n"
        + _table(results, E)
        + "\nCV = std/mean over experts of the test-set gate mass (importance) or of the routed slots "
        "(counts); 0 is perfectly balanced. Living experts received at least one test example. One seed: "
        f"with {config['data']['test']} test examples one example is {100 / config['data']['test']:.2f} accuracy "
        "points, so differences of a point or two are within seed-to-seed noise.\n\n"
        + _findings(results, E)
        + "\n![expert utilisation](utilisation.png)\n\n## Configurations\n\n" + notes + "\n\n"
        "Hash routing sends each example by its id, so it balances load but cannot specialise: the test "
        f"examples' ids were never seen in training, and each expert sees a random 1/{E} of the data.\n"
    )
    with report_directory(out) as stage:
        _plot(results, stage / "utilisation.png")
        write_json(stage / "results.json", {"config": config, "environment": environment(), "results": results})
        atomic_write_text(stage / "report.md", report)
