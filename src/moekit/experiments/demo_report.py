"""Report of ``moekit demo``: the configuration table (means with 95% intervals over seeds, accuracy paired
against the dense softmax gate) and the expert-utilisation plot. ``SECTIONS`` render ``report.md`` and
``docs/demo.md``'s generated blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..confidence import paired_difference
from ..reporting import markdown_table, save_figure
from .demo import REFERENCE
from .report_common import (
    cell, is_smoke, mean_cell, plot_title, pyplot, report_sections, runs_by, write_markdown_report
)

__all__ = ["SECTIONS", "runs_by_label", "write_figures", "write_report"]


def runs_by_label(results: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Runs per configuration, in the config's seed order."""
    return runs_by(results, "label")


def _vs_reference(results: Mapping[str, Any], label: str) -> str:
    by = runs_by_label(results)
    if label == REFERENCE or REFERENCE not in by:
        return "—"
    ref = {r["seed"]: r["accuracy"] for r in by[REFERENCE]}
    pairs = [(r["accuracy"], ref[r["seed"]]) for r in by[label] if r["seed"] in ref]
    return cell(paired_difference([a for a, _ in pairs], [b for _, b in pairs]), scale=100)


def _setup(results: Mapping[str, Any], **_: str) -> str:
    cfg, data = results["config"], results["data"]
    return (
        f"Each model: a linear embedding (64 -> {cfg['dim']}), one residual MoE block with {cfg['num_experts']} MLP "
        f"experts, and a linear head; trained {cfg['epochs']} epochs with AdamW (lr {cfg['lr']}, batch "
        f"{cfg['batch_size']}) on {data['train']} of the 1797 digits; metrics on the held-out {data['test']}. "
        f"{len(cfg['seeds'])} seed(s) ({', '.join(map(str, cfg['seeds']))}): each draws a new split and "
        "initialisation, shared by every configuration.\n"
    )


def _results(results: Mapping[str, Any], **_: str) -> str:
    E = results["config"]["num_experts"]
    timing = results["timing"]["runs"]
    rows = []
    for label, rs in runs_by_label(results).items():
        seconds = [timing[f"{label}/s{r['seed']}"]["train_s"] for r in rs]
        rows.append([label, mean_cell([r["accuracy"] for r in rs], scale=100), _vs_reference(results, label),
                     mean_cell([r["cv_importance"] for r in rs], spec=".2f"),
                     mean_cell([r["cv_counts"] for r in rs], spec=".2f"),
                     f"{sum(r['living_experts'] for r in rs) / len(rs):.1f}/{E}", f"{sum(seconds) / len(seconds):.1f}"])
    headers = ["configuration", "test accuracy % [95% CI]", f"minus {REFERENCE}, points [95% CI]", "CV importance",
               "CV counts", "living experts", "train s"]  # fmt: skip
    text = markdown_table(headers, rows) + (
        "\nMeans over seeds with 95% t-intervals; the accuracy difference is paired by seed. CV = std/mean over "
        "experts of the test-set gate mass (importance) or of the routed slots (counts); 0 is perfectly balanced "
        "(CV of counts is 0 by construction for the dense gate and for expert choice). Living experts received at "
        "least one test example (mean over seeds). Train seconds are wall-clock on the machine named above.\n"
    )
    if not is_smoke(results):
        differ = [label for label, rs in runs_by_label(results).items() if label != REFERENCE
                  and _excludes_zero(results, label)]  # fmt: skip
        text += ("\nConfigurations whose accuracy differs from the dense gate's (the paired 95% interval excludes 0): "
                 + (", ".join(differ) if differ else "none") + ".\n")  # fmt: skip
    return text


def _excludes_zero(results: Mapping[str, Any], label: str) -> bool:
    by = runs_by_label(results)
    ref = {r["seed"]: r["accuracy"] for r in by[REFERENCE]}
    pairs = [(r["accuracy"], ref[r["seed"]]) for r in by[label] if r["seed"] in ref]
    return paired_difference([a for a, _ in pairs], [b for _, b in pairs]).excludes(0.0)


def _configurations(results: Mapping[str, Any], **_: str) -> str:
    return "\n".join(f"- **{c['label']}** -- {c['note']}." for c in results["configurations"]) + "\n"


SECTIONS = report_sections(setup=_setup, results=_results, configurations=_configurations,
                           figures=lambda results: [("utilisation.png", "expert utilisation")])


def write_figures(results: Mapping[str, Any], directory: str | Path) -> None:
    """``utilisation.png``: share of the test routing slots of each seed's busiest, second busiest, ...
    expert, mean over seeds (expert ids are arbitrary, so each seed's shares are sorted before averaging)."""
    import numpy as np

    plt = pyplot()
    by = runs_by_label(results)
    shares = []
    for rs in by.values():
        s = np.array([r["tokens_per_expert"] for r in rs], dtype=float)
        share = s / np.maximum(s.sum(1, keepdims=True), 1)
        shares.append(-np.sort(-share, axis=1).mean(0))
    shares = np.array(shares)
    E = shares.shape[1]
    fig, ax = plt.subplots(figsize=(2.6 + 0.65 * E, 1.2 + 0.45 * len(by)), layout="constrained")
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0)
    ax.set_yticks(range(len(by)), list(by))
    ax.set_xticks(range(E), [str(r) for r in range(1, E + 1)])
    ax.set_xlabel("expert, ranked by its share within each seed (1 = busiest)")
    ax.set_title(plot_title(results, f"share of test-set routing slots per expert rank\n(mean over "
                                     f"{len(results['config']['seeds'])} seed(s); uniform = 1/{E} = {1 / E:.3f})"))
    for i in range(shares.shape[0]):
        for j in range(E):
            ax.text(j, i, f"{abs(shares[i, j]):.2f}", ha="center", va="center", fontsize=8,
                    color="black" if shares[i, j] > 0.6 * shares.max() else "white")  # fmt: skip
    fig.colorbar(image, ax=ax, label="share of routing slots")
    save_figure(fig, Path(directory) / "utilisation.png")


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """``report.md`` and ``utilisation.png`` in ``out``."""
    return write_markdown_report(results, out, SECTIONS, write_figures,
                                 order=("setup", "command", "results", "configurations"),
                                 title="moekit demo: routers and balancing losses on scikit-learn digits",
                                 headings={"configurations": "Configurations"},
                                 figures=[("utilisation.png", "Expert utilisation")])  # fmt: skip
