"""PNG plots of routing analyses (matplotlib, Agg backend; files written atomically).

Every figure reads on its own: one panel per layer in a grid (never a strip of many narrow panels),
every colour explained by a legend or a labelled colour bar, every reference line named in a legend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..reporting import save_figure
from .metrics import LayerAnalysis

__all__ = [
    "plot_utilisation",
    "plot_load_over_data",
    "plot_coactivation",
    "plot_entropy",
    "plot_value_tables",
    "plot_accuracy_vs_k",
    "plot_forced_experts",
    "plot_embedding",
    "draw_heatmap",
    "panel_grid",
]

MAX_COLUMNS = 3
REFERENCE = {"color": "black", "linestyle": "--", "linewidth": 1.0}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(n: int, *, width: float = 4.2, height: float = 3.2, columns: int = MAX_COLUMNS) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels in rows of at most ``columns``; unused grid cells are hidden."""
    plt = _plt()
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False,
                             layout="constrained")  # fmt: skip
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _expert_ticks(ax: Any, E: int, axis: str = "x") -> None:
    ticks = list(range(E)) if E <= 16 else list(range(0, E, math.ceil(E / 16)))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)


def plot_utilisation(analyses: Sequence[LayerAnalysis], path: str | Path) -> Path:
    """Per layer: mean gate weight and share of routed slots per expert, against the even share 1/E."""
    fig, axes = panel_grid(len(analyses))
    for ax, a in zip(axes, analyses):
        E = a.num_experts
        x = torch.arange(E).float()
        share = a.counts / a.counts.sum().clamp_min(1)
        ax.bar((x - 0.2).tolist(), a.mean_gate.tolist(), width=0.4, color="tab:blue", label="mean gate weight")
        ax.bar((x + 0.2).tolist(), share.tolist(), width=0.4, color="tab:orange", label="share of routed slots")
        ax.axhline(1.0 / E, **REFERENCE, label="even use (1/E)")
        ax.set_title(f"{a.name}\nCV importance {a.cv_importance:.2f}, living {a.living_experts}/{E}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction")
        _expert_ticks(ax, E)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle("Expert utilisation per layer")
    return save_figure(fig, path)


def plot_load_over_data(analyses: Sequence[LayerAnalysis], path: str | Path) -> Path:
    """Per layer: the spread over consecutive slices of the data of each expert's share of routed slots."""
    shown = [a for a in analyses if a.load_share is not None and a.load_share.shape[0] > 1]
    if not shown:
        raise ValueError("no layer routed enough tokens to split into slices")
    fig, axes = panel_grid(len(shown))
    for ax, a in zip(axes, shown):
        E, share = a.num_experts, a.load_share
        assert share is not None
        ax.boxplot([share[:, e].tolist() for e in range(E)], positions=list(range(E)), widths=0.6,
                   medianprops={"color": "tab:blue"}, flierprops={"markersize": 3})  # fmt: skip
        ax.axhline(1.0 / E, **REFERENCE, label="even load (1/E)")
        worst = float((share.max(-1).values * E - 1).mean())
        ax.set_title(f"{a.name}\nbusiest expert per slice: {worst:+.0%} over even (mean)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of the slice's slots")
        _expert_ticks(ax, E)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **REFERENCE, label="even load (1/E)"),
               Line2D([], [], color="tab:blue", label="median over slices (box: quartiles, whiskers: 1.5 IQR)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9)
    slices = shown[0].load_share.shape[0]  # type: ignore[union-attr]
    fig.suptitle(f"Load balance over the data ({slices} consecutive slices of the tokens)")
    return save_figure(fig, path)


def draw_heatmap(ax: Any, matrix: Tensor, fmt: str, *, annotate: bool, vmin: float | None = None,
                 vmax: float | None = None) -> Any:  # fmt: skip
    """``imshow`` of a matrix on ``ax``, optionally with every value written in its cell."""
    image = ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    if annotate:
        peak = float(matrix.nan_to_num().max()) if vmax is None else vmax
        peak = peak or 1.0
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                v = float(matrix[i, j])
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 * peak else "k")  # fmt: skip
    return image


def _heatmap_grid(
    matrices: Sequence[tuple[str, Tensor]], path: str | Path, *, title: str, colorbar: str, ylabel: str,
    row_names: Sequence[str] = (), fmt: str = ".2f",
) -> Path:  # fmt: skip
    """One heatmap per layer (rows x experts) with one shared, labelled colour bar."""
    rows = max(m.shape[0] for _, m in matrices)
    cols = max(m.shape[1] for _, m in matrices)
    fig, axes = panel_grid(len(matrices), width=max(3.6, 1.4 + 0.42 * cols), height=max(2.8, 1.2 + 0.3 * min(rows, 40)))
    vmax = max(float(m.nan_to_num().max()) for _, m in matrices) or 1.0
    image = None
    for ax, (name, m) in zip(axes, matrices):
        image = draw_heatmap(ax, m, fmt, annotate=m.shape[0] <= 16 and m.shape[1] <= 10, vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        _expert_ticks(ax, m.shape[1])
        if m.shape[0] <= 40:
            names = list(row_names) if len(row_names) == m.shape[0] else [str(i) for i in range(m.shape[0])]
            ax.set_yticks(range(m.shape[0]), names, fontsize=7)
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=axes, label=colorbar, shrink=0.9)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_coactivation(analyses: Sequence[LayerAnalysis], path: str | Path) -> Path:
    """Per layer: the fraction of tokens that chose both experts i and j (diagonal: chose expert i)."""
    matrices = [(a.name, a.coactivation / max(a.tokens, 1)) for a in analyses]
    return _heatmap_grid(matrices, path, title="Co-activation: experts chosen together",
                         colorbar="fraction of tokens routed to both experts\n(diagonal: to that expert)",
                         ylabel="expert")  # fmt: skip


def plot_value_tables(
    tables: Sequence[tuple[str, Tensor]], path: str | Path, *, what: str, names: Sequence[str] = ()
) -> Path:
    """Per layer: mean gate weight of each expert for each value of ``what`` (a label or metadata field);
    values absent from the data (NaN rows) are left out."""
    present = ~torch.stack([t.isnan().all(-1) for _, t in tables]).all(0)
    if not bool(present.any()):
        raise ValueError(f"no value of {what!r} occurs in the data")
    kept = present.nonzero().flatten().tolist()
    names = [names[i] if i < len(names) else str(i) for i in kept]
    tables = [(layer, t[kept]) for layer, t in tables]
    return _heatmap_grid(tables, path, title=f"Specialisation: mean gate weight per {what} and expert",
                         colorbar="mean gate weight", ylabel=what, row_names=names)  # fmt: skip


def plot_entropy(analyses: Sequence[LayerAnalysis], path: str | Path) -> Path:
    """Per layer: histogram of per-token router entropy, against log E (a router that cannot decide)."""
    shown = [a for a in analyses if a.entropy_values is not None and a.entropy_values.numel() > 0]
    if not shown:
        raise ValueError("no layer has a router distribution to take the entropy of")
    fig, axes = panel_grid(len(shown))
    for ax, a in zip(axes, shown):
        values = a.entropy_values
        assert values is not None
        ax.hist(values.tolist(), bins=30, range=(0.0, a.max_entropy * 1.02), color="tab:purple",
                label="tokens")  # fmt: skip
        ax.axvline(a.max_entropy, **REFERENCE, label="log E (uniform: undecided)")
        ax.axvline(float(values.mean()), color="tab:red", linestyle=":", linewidth=1.5, label="mean over tokens")
        ax.set_title(a.name, fontsize=9)
        ax.set_xlabel("router entropy per token (nats)")
        ax.set_ylabel("tokens")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle("Routing entropy (0 = certain of one expert)")
    return save_figure(fig, path)


def plot_accuracy_vs_k(
    curves: Mapping[str, Mapping[int, float]], path: str | Path, *, train_k: int | None = None, ylabel: str = "accuracy"
) -> Path:
    """One line per model: metric against inference-time k; dotted: the k the model was trained with."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for label, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=label)
    if train_k is not None:
        ax.axvline(train_k, color="grey", linestyle=":", linewidth=1.5, label=f"trained k = {train_k}")
    ax.set_xlabel("experts per token at inference (k)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({k for c in curves.values() for k in c}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{ylabel} against inference-time k")
    return save_figure(fig, path)


def plot_forced_experts(
    accuracies: Mapping[str, Sequence[float]], path: str | Path, *, reference: float | None = None,
    ylabel: str = "accuracy",
) -> Path:  # fmt: skip
    """Per layer: the metric with every token of that layer sent to one expert (a stem from the routed
    model's value, dashed, to each forced value)."""
    fig, axes = panel_grid(len(accuracies))
    values = [v for accs in accuracies.values() for v in accs] + ([reference] if reference is not None else [])
    low, high = min(values), max(values)
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.05
    for ax, (layer, accs) in zip(axes, accuracies.items()):
        x = list(range(len(accs)))
        if reference is not None:
            ax.axhline(reference, **REFERENCE, label="routed model")
            ax.vlines(x, reference, list(accs), color="tab:green", linewidth=2)
        ax.plot(x, list(accs), "o", color="tab:green", markersize=7, label="that expert forced")
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("expert every token is sent to")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        _expert_ticks(ax, len(accs))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"{ylabel} with one expert forced per layer")
    return save_figure(fig, path)


def plot_embedding(
    embedding_N2: Tensor, labels_N: Tensor | None, path: str | Path, *, title: str = "t-SNE of gate logits",
    class_names: Sequence[str] = (), label_name: str = "label",
) -> Path:  # fmt: skip
    """Scatter of a 2-D embedding coloured by label, with a legend naming each label (colour bar for many)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.6), layout="constrained")
    x, y = embedding_N2[:, 0].numpy(), embedding_N2[:, 1].numpy()
    if labels_N is None:
        ax.scatter(x, y, s=6, color="tab:blue")
    else:
        labels = labels_N[: embedding_N2.shape[0]].long()
        present = labels.unique().tolist()
        if len(present) <= 20:
            cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
            for i, value in enumerate(present):
                keep = (labels == value).numpy()
                name = class_names[value] if value < len(class_names) else str(value)
                ax.scatter(x[keep], y[keep], s=6, color=cmap(i), label=name)
            ax.legend(title=label_name, fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            points = ax.scatter(x, y, c=labels.numpy(), cmap="viridis", s=6)
            fig.colorbar(points, ax=ax, label=label_name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
