"""Markdown report (+ PNG plots + JSON) of a ``ModelAnalysis``, meant to be read top to bottom.

``write_analysis_report`` builds the whole directory in a temporary sibling and renames it into
place, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..reporting import atomic_directory, atomic_write_text, environment, markdown_table, write_json
from .metrics import LayerAnalysis
from .model import ModelAnalysis
from .plots import (
    plot_accuracy_vs_k,
    plot_coactivation,
    plot_embedding,
    plot_entropy,
    plot_forced_experts,
    plot_load_over_data,
    plot_utilisation,
    plot_value_tables,
)

__all__ = ["write_analysis_report", "analysis_markdown", "REPORT_FILES"]

#: every PNG the report can contain (the t-SNE plots are ``tsne_<layer index>.png``)
REPORT_FILES = ("utilisation.png", "load_over_data.png", "entropy.png", "coactivation.png", "class_table.png",
                "metric_vs_k.png", "forced_experts.png")  # fmt: skip

_DEFINITIONS = """\
## How to read this report

- **mean gate**: average combine weight an expert gets per token (1/E everywhere = perfectly even use).
- **CV importance / CV counts**: std / mean over experts of the total gate weight and of the number of
  tokens routed (0 = balanced; the largest possible value is sqrt(E - 1) when one expert takes all).
- **load over the data**: the tokens are cut into consecutive slices (in data order); the spread of an
  expert's share over slices shows whether balance holds throughout the data or only on average.
  *Max load* is the busiest expert's share of a slice times E, minus 1 (0 = even), averaged over slices.
- **entropy**: entropy (nats) of each token's router distribution; 0 = certain of one expert,
  log E = undecided.
- **living experts**: experts with mean gate > 0.01 (Pavlitska et al., arXiv:2204.10598).
- **MI / NMI**: mutual information between a token's main expert (largest gate) and its label (or a
  metadata field), in nats, and divided by the entropy of the label: NMI = 1 when the expert choice
  tells the label exactly, 0 when it says nothing about it.
- **over-represented values**: among the tokens whose main expert is e, the values (labels, tokens)
  whose share there is largest relative to their share overall (lift = P(value | e) / P(value);
  values with fewer than 3 such tokens are left out).
- **forced expert**: every token of the layer goes to that one expert with weight 1 (generalist
  experts keep most of the metric; specialists lose it).
- **metric vs inference k**: the same weights run with k experts per token (a model whose metric
  barely changes at k = 1 has experts that each work on their own).
"""


def _shown(key: str, analysis: ModelAnalysis) -> str:
    """What a mutual-information / table key is called in the report (``"label"`` -> the label's name)."""
    return analysis.label_name if key == "label" else key


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.4g}"


def _layer_table(analysis: ModelAnalysis) -> str:
    keys = sorted({k for a in analysis.layers.values() for k in a.mutual_info})
    headers = ["layer", "tokens", "E", "CV importance", "CV counts", "max load", "entropy / log E", "living"]
    headers += [f"NMI {_shown(k, analysis)}" for k in keys]
    rows = []
    for a in analysis.layers.values():
        load = float("nan") if a.load_share is None or not a.load_share.numel() else \
            float((a.load_share.max(-1).values * a.num_experts - 1).mean())  # fmt: skip
        rows.append([a.name, a.tokens, a.num_experts, a.cv_importance, a.cv_counts, load, a.entropy / a.max_entropy
                     if a.num_experts > 1 else float("nan"), f"{a.living_experts}/{a.num_experts}"]
                    + [a.mutual_info.get(k, {}).get("nmi", float("nan")) for k in keys])  # fmt: skip
    return markdown_table(headers, rows, floatfmt=".3f")


def _value_name(names: Sequence[str], value: int) -> str:
    name = names[value] if value < len(names) and names[value] else str(value)
    return name.replace("|", "\\|")


def _top_table(a: LayerAnalysis, analysis: ModelAnalysis) -> str:
    """Per expert: its share of the tokens and the values it over-represents (labels, then metadata)."""
    share = a.counts / a.counts.sum().clamp_min(1)
    keys = list(a.top_values)
    names = {"label": analysis.class_names, **analysis.group_names}
    rows = []
    for e in range(a.num_experts):
        cells = []
        for key in keys:
            top = a.top_values[key][e]
            cells.append(", ".join(f"{_value_name(names.get(key, ()), t['value'])} ({t['share']:.0%}, x{t['lift']:.1f})"
                                   for t in top[:4]) or "-")  # fmt: skip
        rows.append([e, f"{float(share[e]):.1%}", *cells])
    headers = [f"over-represented {_shown(k, analysis)} (share, lift)" for k in keys]
    return markdown_table(["expert", "share of slots", *headers], rows)


def analysis_markdown(
    analysis: ModelAnalysis, figures: Mapping[str, list[str]], *, title: str, description: str = ""
) -> str:
    """The report text; ``figures`` maps a section to the PNG file names written for it."""
    parts = [f"# {title}\n\n", description + "\n\n" if description else ""]
    if analysis.metric is not None:
        better = "higher" if analysis.higher_is_better else "lower"
        parts.append(f"{analysis.metric_name} of the routed model (trained k = {analysis.trained_k}; {better} is "
                     f"better): **{_fmt(analysis.metric)}**.\n")  # fmt: skip
    parts += ["\n## Utilisation per layer\n\n", _layer_table(analysis), "\n"]
    parts += [f"![utilisation]({f})\n\n" for f in figures.get("utilisation", [])]
    if figures.get("load"):
        parts.append("## Load balance over the data\n\nEach expert's share of the routed slots in consecutive slices "
                     "of the data.\n")
        parts += [f"\n![load over the data]({f})\n\n" for f in figures["load"]]
    if figures.get("entropy"):
        parts.append("## Routing entropy\n")
        parts += [f"\n![routing entropy]({f})\n\n" for f in figures["entropy"]]
    parts.append("## Specialisation\n\n")
    for a in analysis.layers.values():
        for key, mi in a.mutual_info.items():
            parts.append(f"- {a.name}: I(main expert; {_shown(key, analysis)}) = {mi['mi']:.3f} nats, "
                         f"NMI = {mi['nmi']:.3f}\n")
    if not any(a.mutual_info for a in analysis.layers.values()):
        parts.append("The data has no labels or metadata to measure specialisation against.\n")
    for section, alt in (("class_table", "label x expert"), ("groups", "metadata x expert")):
        parts += [f"\n![{alt}]({f})\n" for f in figures.get(section, [])]
    if any(a.top_values for a in analysis.layers.values()):
        parts.append("\n## What each expert takes\n")
        for a in analysis.layers.values():
            if a.top_values:
                parts += [f"\n### {a.name}\n\n", _top_table(a, analysis)]
    if figures.get("coactivation"):
        parts.append("\n## Co-activation\n\nFraction of tokens that chose both experts (diagonal: that expert).\n")
        parts += [f"\n![co-activation]({f})\n" for f in figures["coactivation"]]
    if analysis.metric_vs_k:
        parts.append(f"\n## {analysis.metric_name} against inference-time k\n\n")
        parts.append(markdown_table(["k", analysis.metric_name], sorted(analysis.metric_vs_k.items()), floatfmt=".4f"))
        parts += [f"\n![metric vs k]({f})\n" for f in figures.get("k", [])]
    if analysis.forced:
        parts.append("\n## One expert forced\n\n")
        E = max(len(v) for v in analysis.forced.values())
        rows = [[layer] + list(accs) + [""] * (E - len(accs)) for layer, accs in analysis.forced.items()]
        parts.append(markdown_table(["layer"] + [f"expert {e}" for e in range(E)], rows, floatfmt=".4f"))
        parts += [f"\n![forced experts]({f})\n" for f in figures.get("forced", [])]
    if figures.get("tsne"):
        parts.append(f"\n## Gate logits in 2-D (t-SNE), coloured by {analysis.label_name}\n")
        parts += [f"\n![t-SNE]({f})\n" for f in figures["tsne"]]
    if analysis.notes:
        parts.append("\n## Not shown\n\n" + "".join(f"- {n}\n" for n in analysis.notes))
    parts.append("\n" + _DEFINITIONS)
    return "".join(parts)


def _plots(analysis: ModelAnalysis, out: Path) -> dict[str, list[str]]:
    layers = list(analysis.layers.values())
    figs: dict[str, list[str]] = {"utilisation": [plot_utilisation(layers, out / "utilisation.png").name]}
    if any(a.load_share is not None and a.load_share.shape[0] > 1 for a in layers):
        figs["load"] = [plot_load_over_data(layers, out / "load_over_data.png").name]
    if any(a.entropy_values is not None and a.entropy_values.numel() for a in layers):
        figs["entropy"] = [plot_entropy(layers, out / "entropy.png").name]
    figs["coactivation"] = [plot_coactivation(layers, out / "coactivation.png").name]
    labelled = [(a.name, a.class_table) for a in layers if a.class_table is not None]
    if labelled:
        figs["class_table"] = [plot_value_tables(labelled, out / "class_table.png", what=analysis.label_name,
                                                 names=analysis.class_names).name]  # fmt: skip
    for key in sorted({k for a in layers for k in a.group_tables}):
        tables = [(a.name, a.group_tables[key]) for a in layers if key in a.group_tables]
        path = plot_value_tables(tables, out / f"group_{key}.png", what=key, names=analysis.group_names.get(key, ()))
        figs.setdefault("groups", []).append(path.name)
    for i, a in enumerate(layers):
        if a.name in analysis.embeddings:
            path = plot_embedding(analysis.embeddings[a.name], analysis.embedding_labels.get(a.name),
                                  out / f"tsne_{i}.png", title=f"t-SNE of gate logits: {a.name}",
                                  class_names=analysis.class_names, label_name=analysis.label_name)  # fmt: skip
            figs.setdefault("tsne", []).append(path.name)
    if analysis.metric_vs_k:
        figs["k"] = [plot_accuracy_vs_k({"routed model": analysis.metric_vs_k}, out / "metric_vs_k.png",
                                        train_k=analysis.trained_k, ylabel=analysis.metric_name).name]  # fmt: skip
    if analysis.forced:
        figs["forced"] = [plot_forced_experts(analysis.forced, out / "forced_experts.png", reference=analysis.metric,
                                              ylabel=analysis.metric_name).name]  # fmt: skip
    return figs


def write_analysis_report(
    analysis: ModelAnalysis,
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Routing analysis",
    description: str = "",
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    name: str = "out_dir",
) -> Path:
    """Write ``report.md``, ``analysis.json`` and PNGs into ``out_dir``: it must be absent or empty
    unless ``overwrite`` (which replaces only an earlier output of moekit), and must not overlap
    ``inputs`` (e.g. the analysed checkpoint). ``name`` is the argument named in errors."""
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite, inputs=inputs, name=name, writer="write_analysis_report") as stage:
        figures = _plots(analysis, stage)
        write_json(
            stage / "analysis.json", {"config": dict(config or {}), "environment": environment(), **analysis.as_dict()}
        )
        atomic_write_text(stage / "report.md", analysis_markdown(analysis, figures, title=title, description=description))
    return out
