"""Markdown report (+ PNG plots + JSON) of a ``ModelAnalysis``, meant to be read top to bottom.

``write_analysis_report`` builds the whole directory in a temporary sibling and renames it into
place, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..reporting import atomic_directory, atomic_write_text, environment, markdown_table, write_json
from .model import ModelAnalysis
from .plots import (
    plot_accuracy_vs_k,
    plot_class_table,
    plot_coactivation,
    plot_embedding,
    plot_forced_experts,
    plot_utilisation,
)

__all__ = ["write_analysis_report", "analysis_markdown"]

_DEFINITIONS = """\
## How to read this report

- **mean gate**: average combine weight an expert gets per token (1/E everywhere = perfectly even use).
- **CV importance / CV counts**: std / mean over experts of the total gate weight and of the number of
  tokens routed (0 = balanced; the largest possible value is sqrt(E - 1) when one expert takes all).
- **entropy**: mean entropy (nats) of each token's router distribution; log E = undecided router.
- **living experts**: experts with mean gate > 0.01 (Pavlitska et al., arXiv:2204.10598).
- **MI / NMI**: mutual information between a token's main expert (largest gate) and its label (or a
  metadata field), in nats, and divided by the entropy of the label: NMI = 1 when the expert choice
  tells the label exactly, 0 when it says nothing about it.
- **forced expert**: every token of the layer goes to that one expert with weight 1 (generalist
  experts keep most of the accuracy; specialists lose it).
- **metric vs inference k**: the same weights run with k experts per token (a model whose accuracy
  barely drops at k = 1 has experts that each work on their own).
"""


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.4g}"


def _layer_table(analysis: ModelAnalysis) -> str:
    keys = sorted({k for a in analysis.layers.values() for k in a.mutual_info})
    headers = ["layer", "tokens", "E", "CV importance", "CV counts", "entropy", "living"] + [f"NMI {k}" for k in keys]
    rows = []
    for a in analysis.layers.values():
        rows.append(
            [
                a.name,
                a.tokens,
                a.num_experts,
                a.cv_importance,
                a.cv_counts,
                a.entropy,
                f"{a.living_experts}/{a.num_experts}",
            ]
            + [a.mutual_info.get(k, {}).get("nmi", float("nan")) for k in keys]
        )
    return markdown_table(headers, rows, floatfmt=".3f")


def analysis_markdown(
    analysis: ModelAnalysis, figures: Mapping[str, list[str]], *, title: str, description: str = ""
) -> str:
    """The report text; ``figures`` maps a section to the PNG file names written for it."""
    parts = [f"# {title}\n\n", description + "\n\n" if description else ""]
    if analysis.metric is not None:
        parts.append(f"Metric of the routed model (trained k = {analysis.trained_k}): **{_fmt(analysis.metric)}**.\n")
    parts += ["\n## Utilisation per layer\n\n", _layer_table(analysis), "\n"]
    parts += [f"![utilisation]({f})\n\n" for f in figures.get("utilisation", [])]
    parts.append("## Specialisation\n\n")
    for a in analysis.layers.values():
        for key, mi in a.mutual_info.items():
            parts.append(f"- {a.name}: I(main expert; {key}) = {mi['mi']:.3f} nats, NMI = {mi['nmi']:.3f}\n")
    parts += [f"\n![class x expert]({f})\n" for f in figures.get("class_table", [])]
    if figures.get("coactivation"):
        parts.append("\n## Co-activation\n\nTokens that chose both experts (diagonal: tokens per expert).\n")
        parts += [f"\n![co-activation]({f})\n" for f in figures["coactivation"]]
    if analysis.metric_vs_k:
        parts.append("\n## Metric against inference-time k\n\n")
        parts.append(markdown_table(["k", "metric"], sorted(analysis.metric_vs_k.items()), floatfmt=".4f"))
        parts += [f"\n![metric vs k]({f})\n" for f in figures.get("k", [])]
    if analysis.forced:
        parts.append("\n## One expert forced\n\n")
        E = max(len(v) for v in analysis.forced.values())
        rows = [[layer] + list(accs) + [""] * (E - len(accs)) for layer, accs in analysis.forced.items()]
        parts.append(markdown_table(["layer"] + [f"expert {e}" for e in range(E)], rows, floatfmt=".4f"))
        parts += [f"\n![forced experts]({f})\n" for f in figures.get("forced", [])]
    if figures.get("tsne"):
        parts.append("\n## Gate logits in 2-D (t-SNE), coloured by label\n")
        parts += [f"\n![t-SNE]({f})\n" for f in figures["tsne"]]
    if analysis.notes:
        parts.append("\n## Not shown\n\n" + "".join(f"- {n}\n" for n in analysis.notes))
    parts.append("\n" + _DEFINITIONS)
    return "".join(parts)


def _plots(analysis: ModelAnalysis, out: Path) -> dict[str, list[str]]:
    figs: dict[str, list[str]] = {
        "utilisation": [plot_utilisation(list(analysis.layers.values()), out / "utilisation.png").name]
    }
    for i, a in enumerate(analysis.layers.values()):
        if a.class_table is not None:
            figs.setdefault("class_table", []).append(
                plot_class_table(a, out / f"class_table_{i}.png", analysis.class_names).name
            )
        figs.setdefault("coactivation", []).append(plot_coactivation(a, out / f"coactivation_{i}.png").name)
        if a.name in analysis.embeddings:
            path = plot_embedding(
                analysis.embeddings[a.name],
                analysis.embedding_labels.get(a.name),
                out / f"tsne_{i}.png",
                title=f"t-SNE of gate logits: {a.name}",
            )
            figs.setdefault("tsne", []).append(path.name)
    if analysis.metric_vs_k:
        figs["k"] = [
            plot_accuracy_vs_k(
                {"model": analysis.metric_vs_k}, out / "metric_vs_k.png", train_k=analysis.trained_k, ylabel="metric"
            ).name
        ]
    if analysis.forced:
        figs["forced"] = [
            plot_forced_experts(analysis.forced, out / "forced_experts.png", reference=analysis.metric).name
        ]
    return figs


def write_analysis_report(
    analysis: ModelAnalysis,
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Routing analysis",
    description: str = "",
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``report.md``, ``analysis.json`` and PNGs into ``out_dir`` (must not exist unless ``overwrite``)."""
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as stage:
        figures = _plots(analysis, stage)
        write_json(
            stage / "analysis.json", {"config": dict(config or {}), "environment": environment(), **analysis.as_dict()}
        )
        atomic_write_text(stage / "report.md", analysis_markdown(analysis, figures, title=title, description=description))
    return out
