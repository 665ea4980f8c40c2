"""PNG plots of routing analyses (matplotlib, Agg backend; files written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from torch import Tensor

from ..reporting import save_figure
from .metrics import LayerAnalysis

__all__ = [
    "plot_utilisation",
    "plot_coactivation",
    "plot_class_table",
    "plot_accuracy_vs_k",
    "plot_forced_experts",
    "plot_embedding",
    "draw_heatmap",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_utilisation(analyses: Sequence[LayerAnalysis], path: str | Path) -> Path:
    """Mean gate weight per expert, one panel per layer (dashed line: the uniform share 1/E)."""
    plt = _plt()
    n = len(analyses)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 3.2 * n), 3.0), squeeze=False)
    for ax, a in zip(axes[0], analyses):
        ax.bar(range(a.num_experts), a.mean_gate.tolist(), color="tab:blue")
        ax.axhline(1.0 / a.num_experts, color="k", linestyle="--", linewidth=1)
        ax.set_title(f"{a.name}\nCV {a.cv_importance:.2f}, living {a.living_experts}/{a.num_experts}", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_xticks(range(a.num_experts))
    axes[0][0].set_ylabel("mean gate weight")
    return save_figure(fig, path)


def draw_heatmap(ax, matrix: Tensor, fmt: str, *, annotate: bool) -> object:
    """``imshow`` of a matrix on ``ax``, optionally with every value written in its cell."""
    image = ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto")
    if annotate:
        peak = float(matrix.nan_to_num().max()) or 1.0
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                v = float(matrix[i, j])
                ax.text(
                    j, i, format(v, fmt), ha="center", va="center", fontsize=6, color="w" if v < 0.6 * peak else "k"
                )
    return image


def plot_coactivation(analysis: LayerAnalysis, path: str | Path) -> Path:
    """How many tokens chose both experts i and j (diagonal: tokens per expert)."""
    plt = _plt()
    E = analysis.num_experts
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * E, 1.0 + 0.4 * E))
    image = draw_heatmap(ax, analysis.coactivation, ".0f", annotate=E <= 12)
    ax.set_xticks(range(E))
    ax.set_yticks(range(E))
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(f"co-activation: {analysis.name}", fontsize=9)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def plot_class_table(analysis: LayerAnalysis, path: str | Path, class_names: Sequence[str] = ()) -> Path:
    """Mean gate weight per class and expert (rows: classes)."""
    if analysis.class_table is None:
        raise ValueError(f"layer {analysis.name!r} was recorded without labels; no class x expert table")
    plt = _plt()
    L, E = analysis.class_table.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * E, 1.0 + 0.28 * min(L, 40)))
    image = draw_heatmap(ax, analysis.class_table, ".2f", annotate=L <= 20 and E <= 12)
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    if L <= 40:
        ax.set_yticks(range(L), list(class_names) if len(class_names) == L else [str(i) for i in range(L)], fontsize=7)
    ax.set_ylabel("class")
    mi = analysis.mutual_info.get("label", {}).get("nmi", float("nan"))
    ax.set_title(f"mean gate per class: {analysis.name} (NMI {mi:.2f})", fontsize=9)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def plot_accuracy_vs_k(
    curves: Mapping[str, Mapping[int, float]], path: str | Path, *, train_k: int | None = None, ylabel: str = "accuracy"
) -> Path:
    """One line per model: metric against inference-time k."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=label)
    if train_k is not None:
        ax.axvline(train_k, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("experts per image at inference (k)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_forced_experts(
    accuracies: Mapping[str, Sequence[float]], path: str | Path, *, reference: float | None = None
) -> Path:
    """Metric with each single expert forced, one panel per layer; dashed: the routed model."""
    plt = _plt()
    n = len(accuracies)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 3.2 * n), 3.0), squeeze=False)
    for ax, (layer, accs) in zip(axes[0], accuracies.items()):
        ax.bar(range(len(accs)), list(accs), color="tab:orange")
        if reference is not None:
            ax.axhline(reference, color="k", linestyle="--", linewidth=1)
        ax.set_title(f"forced expert: {layer}", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(accs)))
    axes[0][0].set_ylabel("accuracy")
    return save_figure(fig, path)


def plot_embedding(
    embedding_N2: Tensor, labels_N: Tensor | None, path: str | Path, *, title: str = "t-SNE of gate logits"
) -> Path:
    """Scatter of a 2-D embedding, coloured by label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    x, y = embedding_N2[:, 0].numpy(), embedding_N2[:, 1].numpy()
    if labels_N is None:
        ax.scatter(x, y, s=5)
    else:
        labels = labels_N[: embedding_N2.shape[0]]
        num = int(labels.max()) + 1 if labels.numel() else 1
        cmap = "tab10" if num <= 10 else "tab20"
        points = ax.scatter(x, y, c=labels.numpy(), cmap=cmap, s=5, vmin=-0.5, vmax=num - 0.5)
        if num <= 20:
            fig.colorbar(points, ax=ax, ticks=list(range(num)), label="label")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
