"""Report of ``moekit reproduce constraints``: per-configuration tables with 95% intervals over seeds, the
paper's claims (soft vs hard) from differences paired by seed, and plots. ``SECTIONS`` render ``report.md``
and ``docs/constraints.md``'s generated blocks; every number comes from the results dict."""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..confidence import Interval, mean_interval, paired_difference
from ..reporting import markdown_table, save_figure
from .report_common import (
    cell, Claim, claims_table, is_smoke, mean_cell, plot_title, pyplot, report_sections, write_markdown_report
)

__all__ = ["SECTIONS", "group_runs", "kind_means", "claims", "write_figures", "write_report"]

Run = Mapping[str, Any]


def group_runs(runs: Sequence[Run]) -> dict[tuple[Any, ...], list[Run]]:
    """Runs grouped by (constraint, position, E) over seeds, in first-seen order."""
    groups: dict[tuple[Any, ...], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r["constraint"], r["position"], r["num_experts"])].append(r)
    return dict(groups)


def _acc_at(r: Run, k: int) -> float:
    return r.get("accuracy_vs_k", {}).get(str(k), math.nan)


#: the per-run quantities the claims compare: name -> (label, value of a run given the trained k)
METRICS: dict[str, tuple[str, Callable[[Run, int], float]]] = {
    "accuracy": ("test accuracy", lambda r, k: r["accuracy"]),
    "drop_k1": ("accuracy lost at inference k = 1", lambda r, k: _acc_at(r, k) - _acc_at(r, 1)),
    "cv_importance": ("CV of importance", lambda r, k: r["cv_importance"]),
    "nmi_label": ("NMI(expert, class)", lambda r, k: r["nmi"].get("label", math.nan)),
}


def kind_means(runs: Sequence[Run], kind: str, metric: str, train_k: int, *, position: int | None = None
               ) -> dict[int, float]:  # fmt: skip
    """Per seed: the mean of ``metric`` over the runs of constraint ``kind`` (every position and E, or one
    position)."""
    value = METRICS[metric][1]
    per_seed: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        if r["kind"] == kind and (position is None or r["position"] == position):
            per_seed[r["seed"]].append(value(r, train_k))
    return {s: sum(v) / len(v) for s, v in per_seed.items()}


def _paired_kinds(runs: Sequence[Run], a: str, b: str, metric: str, train_k: int, *,
                  position: int | None = None) -> Interval | None:  # fmt: skip
    ma = kind_means(runs, a, metric, train_k, position=position)
    mb = kind_means(runs, b, metric, train_k, position=position)
    seeds = [s for s in ma if s in mb]
    return paired_difference([ma[s] for s in seeds], [mb[s] for s in seeds]) if seeds else None


#: (statement, first kind, second kind, metric, claimed sign of first - second)
CLAIMS = (
    ("soft constraints balance expert use better (CV of importance, soft - hard)", "soft", "hard",
     "cv_importance", "negative"),
    ("soft constraints support specialisation (NMI with the class, soft - hard)", "soft", "hard", "nmi_label",
     "positive"),
    ("hard constraints keep experts generalist: less accuracy lost at k = 1 (points, hard - soft)", "hard",
     "soft", "drop_k1", "negative"),
    ("hard constraints give higher accuracy (points, hard - soft)", "hard", "soft", "accuracy", "positive"),
)  # fmt: skip


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The paper's four claims, each from the per-seed soft and hard means paired by seed."""
    runs, k = results["runs"], results["config"]["k"]
    out = []
    for statement, a, b, metric, claimed in CLAIMS:
        diff = _paired_kinds(runs, a, b, metric, k)
        if diff is not None:
            percent = metric in ("accuracy", "drop_k1")
            out.append(Claim(statement, diff, claimed, scale=100 if percent else 1, spec=".2f" if percent else ".3f"))
    return out


# ---------------------------------------------------------------- sections


def _setup(results: Mapping[str, Any], **_: str) -> str:
    cfg, data = results["config"], results["data"]
    size = f"{data['channels']}x{data['image_size']}x{data['image_size']}"
    steps = cfg["epochs"] * math.ceil(data["num_train"] / cfg["batch_size"])
    return (
        f"{len(cfg['seeds'])} seeds ({', '.join(map(str, cfg['seeds']))}); each draws a new train/test split and a new "
        f"initialisation. Data: {data['name']} ({data['num_train']} training / {data['num_test']} test images of "
        f"{size}, {data['num_classes']} classes). Model: a CIFAR-style ResNet-18 of width {cfg['width']}; the MoE "
        f"replaces stage {' or '.join(map(str, cfg['positions']))} with "
        f"E = {' or '.join(map(str, cfg['num_experts']))} "
        f"narrow copies of the stage (inner width {cfg['expert_ratio']}x), a GAP-FC gate, top-{cfg['k']} per image, "
        f"residual = {cfg['residual']}. Training: AdamW, lr {cfg['lr']}, batch {cfg['batch_size']}, {cfg['epochs']} "
        f"epochs ({steps} optimiser steps), no augmentation. Soft constraints add their loss with weight "
        f"{cfg['soft_weight']} (noisy gate, the paper's final grid); hard constraints mask over-used experts in "
        f"training with tau = {cfg['tau_relative']} (relative) and {cfg['tau_mean']} (mean), without gate noise; "
        f"constraints run: {', '.join(cfg['constraints'])}; plus the dense network. All metrics on the test set in "
        "eval mode (no masking, no noise).\n"
    )


def _results(results: Mapping[str, Any], **_: str) -> str:
    k = results["config"]["k"]
    groups = group_runs(results["runs"])
    meta = sorted({m for rs in groups.values() for r in rs for m in r.get("nmi", {})} - {"label"})
    headers = ["constraint", "kind", "stage", "E", f"accuracy % (k={k})", "accuracy % at k=1", "CV importance",
               "CV counts", "living", "NMI class", *[f"NMI {m}" for m in meta]]  # fmt: skip
    rows = []
    for (constraint, pos, E), rs in groups.items():
        if constraint == "dense":
            rows.append(["dense", "dense", "—", "—", mean_cell([r["accuracy"] for r in rs], scale=100)]
                        + ["—"] * (5 + len(meta)))  # fmt: skip
            continue
        rows.append([
            constraint, rs[0]["kind"], pos, E, mean_cell([r["accuracy"] for r in rs], scale=100),
            mean_cell([_acc_at(r, 1) for r in rs], scale=100), mean_cell([r["cv_importance"] for r in rs], spec=".2f"),
            mean_cell([r["cv_counts"] for r in rs], spec=".2f"),
            f"{sum(r['living_experts'] for r in rs) / len(rs):.1f}/{E}",
            mean_cell([r["nmi"].get("label", math.nan) for r in rs], spec=".2f"),
            *[mean_cell([r["nmi"].get(m, math.nan) for r in rs], spec=".2f") for m in meta],
        ])  # fmt: skip
    return markdown_table(headers, rows) + (
        f"\nMean over {len(results['config']['seeds'])} seeds with a 95% t-interval. CV = std / mean over experts of "
        "the total gate weight (importance) or of the images routed (counts): 0 is perfectly balanced, "
        "sqrt(E - 1) is everything on one expert. Living = experts with mean gate weight > 0.01 (mean over seeds). "
        "NMI = mutual information between an image's main expert and its class (or metadata), divided by the "
        "class (metadata) entropy.\n"
    )


def _comparisons(results: Mapping[str, Any], **_: str) -> str:
    runs, cfg = results["runs"], results["config"]
    text = ("The paper's claims, each from per-seed means over the soft (importance, KL) and hard (relative, mean) "
            "constraints of every stage and E, paired by seed:\n\n")  # fmt: skip
    checked = claims(results)
    text += claims_table(checked, smoke=is_smoke(results)) if checked else "(this run lacks soft or hard constraints)\n"
    rows = []
    for pos in cfg["positions"]:
        for statement, a, b, metric, _ in CLAIMS:
            diff = _paired_kinds(runs, a, b, metric, cfg["k"], position=pos)
            if diff is not None:
                percent = metric in ("accuracy", "drop_k1")
                rows.append([pos, f"{METRICS[metric][0]} ({a} - {b})",
                             cell(diff, scale=100 if percent else 1, spec=".2f" if percent else ".3f")])  # fmt: skip
    if rows:
        text += ("\nThe same differences per stage (informative; the claims above pool the stages):\n\n"
                 + markdown_table(["stage", "difference", "[95% CI]"], rows))  # fmt: skip
    return text


def _figure_list(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    figures = [("claims.png", "Soft minus hard, per seed and pooled"),
               ("accuracy_vs_k.png", "Accuracy against inference-time k"),
               ("cv_importance.png", "Balance by stage")]  # fmt: skip
    shown = _shown(results)
    if any("class_table" in r.get("plots", {}) for r in shown):
        figures.append(("class_tables.png", "Class x expert gate weight"))
        figures.append(("coactivation.png", "Co-activation of experts"))
    if any("tsne" in r.get("plots", {}) for r in shown):
        figures.append(("tsne.png", "t-SNE of the gate logits"))
    return figures


def _timing(results: Mapping[str, Any], **_: str) -> str:
    train = results["timing"]["runs"]
    groups = group_runs(results["runs"])
    rows = [[c, p if p is not None else "—", E if c != "dense" else "—",
             f"{sum(train[r['name']]['train_s'] for r in rs) / len(rs):.1f}"] for (c, p, E), rs in groups.items()]
    return markdown_table(["constraint", "stage", "E", "train s (mean)"], rows) + (
        "\nWall-clock on the machine named above (shared with other jobs).\n"
    )


SECTIONS = report_sections(setup=_setup, results=_results, comparisons=_comparisons, timing=_timing,
                           claims=claims, figures=_figure_list)  # fmt: skip


# ---------------------------------------------------------------- figures


def _shown(results: Mapping[str, Any]) -> list[Run]:
    """The first seed's runs at the configuration the specialisation plots show."""
    cfg = results["config"]
    pos, E, first = cfg["positions"][-1], cfg["num_experts"][0], cfg["seeds"][0]
    return [r for r in results["runs"] if r["seed"] == first and r["position"] == pos and r["num_experts"] == E
            and "plots" in r]  # fmt: skip


def _plot_claims(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    runs, k = results["runs"], results["config"]["k"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), squeeze=False, layout="constrained")
    for ax, (statement, a, b, metric, claimed) in zip(axes.flat, CLAIMS):
        ma, mb = kind_means(runs, a, metric, k), kind_means(runs, b, metric, k)
        seeds = [s for s in ma if s in mb]
        scale = 100 if metric in ("accuracy", "drop_k1") else 1
        diffs = [(ma[s] - mb[s]) * scale for s in seeds]
        ax.scatter(diffs, range(len(seeds)), color="tab:grey", label="one seed", zorder=3)
        if seeds:
            iv = mean_interval(diffs)
            if iv.defined:
                ax.axvspan(iv.low, iv.high, color="tab:blue", alpha=0.25, label="95% CI of the mean")
            ax.axvline(iv.estimate, color="tab:blue", label="mean over seeds")
        ax.axvline(0, color="black", linestyle="--", linewidth=1, label="no difference")
        ax.set_yticks(range(len(seeds)), [f"seed {s}" for s in seeds], fontsize=8)
        unit = " (points)" if scale == 100 else ""
        ax.set_xlabel(f"{METRICS[metric][0]}{unit}: {a} - {b}")
        ax.set_title(textwrap.fill(f"claim: {statement.split(' (')[0]}", 60), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(plot_title(results, "the paper's claims: differences paired by seed"))
    save_figure(fig, path)


def _plot_k(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    cfg, groups = results["config"], group_runs(results["runs"])
    P, N = cfg["positions"], cfg["num_experts"]
    dense = [r["accuracy"] for r in results["runs"] if r["constraint"] == "dense"]
    fig, axes = plt.subplots(len(P), len(N), figsize=(5.2 * len(N), 3.6 * len(P)), squeeze=False, layout="constrained")
    for (constraint, pos, E), rs in groups.items():
        if constraint == "dense":
            continue
        ax = axes[P.index(pos)][N.index(E)]
        ks = list(range(1, E + 1))
        ivs = [mean_interval([_acc_at(r, kk) for r in rs]) for kk in ks]
        line = ax.plot(ks, [100 * iv.estimate for iv in ivs], marker="o", markersize=3, label=constraint)[0]
        if all(iv.defined for iv in ivs):
            ax.fill_between(ks, [100 * iv.low for iv in ivs], [100 * iv.high for iv in ivs], color=line.get_color(),
                            alpha=0.15)  # fmt: skip
    for i, pos in enumerate(P):
        for j, E in enumerate(N):
            ax = axes[i][j]
            if dense:
                ax.axhline(100 * sum(dense) / len(dense), color="k", linestyle="--", linewidth=1,
                           label="dense network (mean)")  # fmt: skip
            ax.axvline(cfg["k"], color="grey", linestyle=":", linewidth=1, label=f"trained k = {cfg['k']}")
            ax.set_title(f"MoE at stage {pos}, E = {E}", fontsize=10)
            ax.set_xlabel("k at inference")
            ax.set_ylabel("test accuracy %")
            ax.set_xticks(range(1, E + 1))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(plot_title(results, "accuracy against inference-time k (mean over seeds; bands: 95% CI)"))
    save_figure(fig, path)


def _plot_cv(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    cfg, groups = results["config"], group_runs(results["runs"])
    P, N, C = cfg["positions"], cfg["num_experts"], cfg["constraints"]
    fig, axes = plt.subplots(1, len(N), figsize=(5.0 * len(N), 3.6), squeeze=False, layout="constrained")
    width = 0.8 / max(len(C), 1)
    for j, E in enumerate(N):
        ax = axes[0][j]
        for c_i, c in enumerate(C):
            ivs = [mean_interval([r["cv_importance"] for r in groups.get((c, p, E), [])] or [math.nan]) for p in P]
            est = [iv.estimate for iv in ivs]
            err = [[iv.estimate - iv.low if iv.defined else 0 for iv in ivs],
                   [iv.high - iv.estimate if iv.defined else 0 for iv in ivs]]  # fmt: skip
            ax.bar([x + c_i * width for x in range(len(P))], est, width=width, yerr=err, capsize=2, label=c)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(P))], [f"stage {p}" for p in P])
        ax.set_ylabel("CV of importance (test; 0 = balanced)")
        ax.set_title(f"E = {E}; error bars: 95% CI over seeds", fontsize=10)
        ax.legend(fontsize=8, title="constraint", title_fontsize=8)
    fig.suptitle(plot_title(results, "balance of expert use by stage"))
    save_figure(fig, path)


def _plot_tables(results: Mapping[str, Any], key: str, path: Path) -> None:
    """Class x expert tables or co-activation matrices of the shown runs, a grid with one colour bar each."""
    plt = pyplot()
    import numpy as np

    runs = [r for r in _shown(results) if r["plots"].get(key) is not None]
    if not runs:
        return
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    first = np.array(runs[0]["plots"][key], dtype=float)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, max(3.4, 0.34 * first.shape[0] + 1.4) * rows),
                             squeeze=False, layout="constrained")  # fmt: skip
    class_names = results["data"]["class_names"]
    for ax, r in zip(axes.flat, runs):
        table = np.array(r["plots"][key], dtype=float)
        image = ax.imshow(table, cmap="viridis", aspect="auto", vmin=0)
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                v = table[i, j]
                ax.text(j, i, f"{v:.2f}" if key == "class_table" else f"{v:.0f}", ha="center", va="center",
                        fontsize=8, color="white" if v < 0.6 * table.max() else "black")  # fmt: skip
        ax.set_xticks(range(table.shape[1]))
        ax.set_xlabel("expert")
        if key == "class_table":
            ax.set_yticks(range(table.shape[0]), class_names[: table.shape[0]] or range(table.shape[0]))
            ax.set_ylabel("class")
            label = "mean gate weight"
        else:
            ax.set_yticks(range(table.shape[0]))
            ax.set_ylabel("expert")
            label = "test images routed to both"
        ax.set_title(f"{r['constraint']} ({r['kind']})", fontsize=10)
        fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    what = "class x expert mean gate weight" if key == "class_table" else "co-activation (diagonal: images per expert)"
    r0 = runs[0]
    fig.suptitle(plot_title(results, f"{what}: stage {r0['position']}, E = {r0['num_experts']}, seed {r0['seed']}"))
    save_figure(fig, path)


def _plot_tsne(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    runs = [r for r in _shown(results) if r["plots"].get("tsne")]
    if not runs:
        return
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 0.9), squeeze=False, layout="constrained")
    names = results["data"]["class_names"]
    cmap = plt.get_cmap("tab10" if results["data"]["num_classes"] <= 10 else "tab20")
    for ax, r in zip(axes.flat, runs):
        xy, labels = r["plots"]["tsne"], r["plots"].get("tsne_labels")
        for c in sorted(set(labels)) if labels else [None]:
            pts = [p for p, lab in zip(xy, labels or [None] * len(xy)) if lab == c]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=5, color=cmap(c % cmap.N) if c is not None else "C0",
                       label=names[c] if c is not None and names else str(c))  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{r['constraint']} ({r['kind']})", fontsize=10)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(10, len(labels)), title="class", markerscale=3)
    r0 = runs[0]
    fig.suptitle(plot_title(results, f"t-SNE of the gate logits (test images), stage {r0['position']}, "
                                     f"E = {r0['num_experts']}, seed {r0['seed']}"))  # fmt: skip
    save_figure(fig, path)


def write_figures(results: Mapping[str, Any], directory: str | Path) -> None:
    """``claims.png``, ``accuracy_vs_k.png``, ``cv_importance.png``, and for the shown configuration
    ``class_tables.png``, ``coactivation.png``, ``tsne.png``."""
    directory = Path(directory)
    _plot_claims(results, directory / "claims.png")
    _plot_k(results, directory / "accuracy_vs_k.png")
    _plot_cv(results, directory / "cv_importance.png")
    _plot_tables(results, "class_table", directory / "class_tables.png")
    _plot_tables(results, "coactivation", directory / "coactivation.png")
    _plot_tsne(results, directory / "tsne.png")


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """``report.md`` and the figures in ``out``."""
    return write_markdown_report(
        results, out, SECTIONS, write_figures, figures=_figure_list(results),
        title="Soft vs hard balancing constraints for MoE layers in CNNs",
        headings={"results": "Results per configuration"},
        footer="Saved models: `checkpoints/<run>` (first seed); `moekit analyze <this directory> --run <run>` "
        "analyses one.\n",
    )  # fmt: skip
