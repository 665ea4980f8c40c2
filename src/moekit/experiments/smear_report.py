"""Report of ``moekit reproduce smear``: sections for ``report.md`` and for ``docs/smear.md``'s generated
blocks (``SECTIONS``), figures (``write_figures``). Every number comes from the results dict; every
comparison is paired across seeds with a 95% interval, and the paper's claims get their verdict from it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..confidence import Interval, mean_interval, paired_difference
from ..reporting import markdown_table, save_figure
from .report_common import (
    cell, Claim, claims_table, is_smoke, mean_cell, plot_title, pyplot, report_sections, runs_by,
    write_markdown_report
)

__all__ = ["SECTIONS", "runs_by_method", "paired", "claims", "write_figures", "write_report"]

#: the paper's claims (abstract: SMEAR beats metadata routing and routing learned through gradient
#: estimators): baseline -> statement
CLAIMED_BASELINES = {
    "tag": "SMEAR beats tag (metadata) routing",
    "hash": "SMEAR beats hash routing",
    "top1": "SMEAR beats top-1 routing (gradient through its probability)",
    "st_gumbel": "SMEAR beats straight-through Gumbel routing",
    "reinforce": "SMEAR beats REINFORCE routing",
    "dselect": "SMEAR beats DSelect-k (k=1)",
}


def runs_by_method(results: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Runs per method, in the order of the config's seeds."""
    return runs_by(results, "method")


def _mean_mi(run: Mapping[str, Any]) -> float:
    mi = run["domain_expert_mi_bits"]
    return sum(mi.values()) / len(mi) if mi else math.nan


def paired(results: Mapping[str, Any], a: str, b: str, value: Callable[[Mapping[str, Any]], float]) -> Interval:
    """Interval of ``value(a) - value(b)`` paired by seed (seeds both methods ran)."""
    by = runs_by_method(results)
    seeds = [r["seed"] for r in by[a] if any(q["seed"] == r["seed"] for q in by[b])]
    va = [value(next(r for r in by[a] if r["seed"] == s)) for s in seeds]
    vb = [value(next(r for r in by[b] if r["seed"] == s)) for s in seeds]
    return paired_difference(va, vb)


def _accuracy(run: Mapping[str, Any]) -> float:
    return run["accuracy"]


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The paper's claims that this run can check (needs SMEAR and the baseline)."""
    by = runs_by_method(results)
    out = []
    if "smear" not in by:
        return out
    for baseline, statement in CLAIMED_BASELINES.items():
        if baseline in by:
            out.append(Claim(statement, paired(results, "smear", baseline, _accuracy), scale=100, spec=".2f",
                             unit="points"))  # fmt: skip
    if "hash" in by:
        out.append(Claim("SMEAR's experts specialise by domain (domain-expert MI above hash routing's)",
                         paired(results, "smear", "hash", _mean_mi), spec=".2f", unit="bits"))  # fmt: skip
    return out


# ---------------------------------------------------------------- sections


def _setup(results: Mapping[str, Any], **_: str) -> str:
    cfg, data, seeds = results["config"], results["data"], results["seeds"]
    s0 = seeds[0]
    image = "x".join(str(v) for v in data["image"])
    E = cfg["num_experts"] or len(data["domains"])
    return (
        f"{len(seeds)} seeds ({', '.join(str(s['seed']) for s in seeds)}); each seed draws a new split of the digits "
        f"and pretrains a new backbone. Data: scikit-learn's digits rendered in {len(data['domains'])} domains "
        f"({', '.join(data['domains'])}), {image} images; per seed {s0['train']} training, {s0['val']} validation "
        f"and {s0['test']} test images (validation and test digits are never seen in training, in any domain). "
        f"Backbone: a ResNet-18 of width {cfg['width']}, pretrained on the clean training images for "
        f"{cfg['pretrain_epochs']} epochs and frozen. Adapters: after each of its 8 BasicBlocks, {E} experts "
        f"(bottleneck {cfg['bottleneck']}, swish) at every spatial position, routed per image on the spatial mean; "
        f"a new linear head. Training: Adam, lr {cfg['lr']}, batch {cfg['batch_size']}, gradient clipping "
        f"{cfg['grad_clip']}, at most {cfg['epochs']} epochs, keeping the epoch with the best validation accuracy "
        f"(stopping after {cfg['patience']} epochs without improvement); expert dropout {cfg['expert_dropout']} for "
        f"SMEAR, the ensemble and top-1 (as the official code); REINFORCE coefficients "
        f"{cfg['aux_weights']['policy']} policy, +{cfg['aux_weights']['entropy']} entropy, "
        f"{cfg['aux_weights']['value']} value; DSelect-k gamma {cfg['dselect_gamma']}, entropy "
        f"{cfg['aux_weights']['entropy_reg']}; ST-Gumbel temperature {cfg['gumbel_tau'][0]} -> {cfg['gumbel_tau'][1]} "
        f"over {cfg['gumbel_anneal']:.0%} of the maximum steps; Latent Skills logits at {cfg['skills_lr_scale']:g}x "
        f"the learning rate. Each run is tested once, with its best-validation weights.\n"
    )


def _results(results: Mapping[str, Any], **_: str) -> str:
    by = runs_by_method(results)
    domains = results["data"]["domains"]
    headers = ["method", "test accuracy % [95% CI]", "validation %", *[f"{d} %" for d in domains],
               "experts", "adapter+router params", "best epoch", "domain-expert MI (bits)"]  # fmt: skip
    rows = []
    for method, rs in by.items():
        mi = [_mean_mi(r) for r in rs]
        rows.append([
            f"`{method}`", mean_cell([r["accuracy"] for r in rs], scale=100),
            _pct_mean([r["val_accuracy"] for r in rs]),
            *[_pct_mean([r["per_domain"][d] for r in rs]) for d in range(len(domains))],
            rs[0]["num_experts"], rs[0]["adapter_params"], f"{sum(r['best_epoch'] for r in rs) / len(rs):.1f}",
            "—" if all(math.isnan(v) for v in mi) else mean_cell(mi, spec=".2f"),
        ])  # fmt: skip
    zero = [s["zero_shot_accuracy"] for s in results["seeds"]]
    per = [_pct_mean([s["zero_shot_per_domain"][d] for s in results["seeds"]]) for d in range(len(domains))]
    rows.append(["backbone only (zero-shot)", mean_cell(zero, scale=100), "—", *per,
                 "—", 0, "—", "—"])  # fmt: skip
    n = len(results["seeds"])
    return (
        markdown_table(headers, rows)
        + f"\nTest accuracy: mean over {n} seed(s) with a 95% t-interval; validation and per-domain columns are "
        "means. Domain-expert MI: mutual information between an image's domain and its top expert, mean over the "
        f"8 sites, in bits (at most log2 {len(domains)} = {math.log2(len(domains)):.2f}; tag routing has it by "
        "construction).\n"
    )


def _pct_mean(values: Sequence[float]) -> str:
    return f"{100 * sum(values) / len(values):.1f}"


def _comparisons(results: Mapping[str, Any], **_: str) -> str:
    smoke = is_smoke(results)
    checked = claims(results)
    by = runs_by_method(results)
    others = [m for m in by if m != "smear" and m not in CLAIMED_BASELINES]
    text = "The paper's claims, each from the paired difference SMEAR minus the baseline over seeds:\n\n"
    text += claims_table(checked, smoke=smoke) if checked else "(this run lacks SMEAR or every claimed baseline)\n"
    if "smear" in by and others:
        rows = [[f"SMEAR - `{m}`", cell(paired(results, "smear", m, _accuracy), scale=100)] for m in others]
        text += ("\nComparisons the paper makes no claim about (paired difference in test accuracy, points):\n\n"
                 + markdown_table(["comparison", "difference [95% CI]"], rows))  # fmt: skip
    return text


def _timing(results: Mapping[str, Any], **_: str) -> str:
    timing = results["timing"]["runs"]
    by = runs_by_method(results)
    rows = []
    for method, rs in by.items():
        t = [timing[f"{method}/s{r['seed']}"] for r in rs]
        rows.append([f"`{method}`", f"{sum(x['train_s'] for x in t) / len(t):.1f}",
                     f"{sum(x['infer_ms_per_1k'] for x in t) / len(t):.0f}"])  # fmt: skip
    return (
        markdown_table(["method", "train s (mean)", "inference ms / 1k images"], rows)
        + "\nWall-clock on the machine named above (shared with other jobs: compare roughly; the controlled speed "
        "measurement is `benchmarks/bench_smear.py`).\n"
    )


def _kept_routing(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The first seed's runs that kept routing tables, by method."""
    first = results["config"]["seeds"][0]
    return {r["method"]: r for r in results["runs"] if r["seed"] == first and r["routing"]}


def _figure_list(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(file name, title) of the figures ``write_figures`` writes for these results."""
    kept = _kept_routing(results)
    figures = [("accuracy.png", "Test accuracy per method, and SMEAR's paired difference to each")]
    if "smear" in kept:
        figures.append(("routing_smear.png", "SMEAR's routing per domain at every site (first seed)"))
    if kept:
        figures.append(("routing_methods.png", "Routing per domain at the last site, every routed method (first seed)"))
    return figures


SECTIONS = report_sections(setup=_setup, results=_results, comparisons=_comparisons, timing=_timing,
                           claims=claims, figures=_figure_list)  # fmt: skip


# ---------------------------------------------------------------- figures


def _plot_accuracy(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    by = runs_by_method(results)
    names = list(by)
    acc = [mean_interval([r["accuracy"] for r in by[m]]) for m in names]
    others = [m for m in names if m != "smear"] if "smear" in by else []
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 5.5, 0.45 * len(names) + 1.6),
                             squeeze=False, layout="constrained")  # fmt: skip
    ax = axes[0][0]
    ys = range(len(names))[::-1]
    _interval_bars(ax, ys, acc, 100, "tab:blue", "mean over seeds, 95% CI")
    ax.set_yticks(list(ys), [f"{m}" for m in names])
    ax.set_xlabel("test accuracy %")
    ax.set_title("test accuracy")
    ax.legend(loc="lower left", fontsize=8)
    if others:
        ax = axes[0][1]
        diffs = [paired(results, "smear", m, _accuracy) for m in others]
        ys = range(len(others))[::-1]
        _interval_bars(ax, ys, diffs, 100, "tab:orange", "paired over seeds, 95% CI")
        ax.axvline(0, color="black", linewidth=1, linestyle="--", label="no difference")
        ax.set_yticks(list(ys), others)
        ax.set_xlabel("SMEAR minus method, accuracy points")
        ax.set_title("SMEAR's advantage (right of the dashed line: SMEAR better)")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(plot_title(results, f"SMEAR comparison on domain-digits, {len(results['seeds'])} seed(s)"))
    save_figure(fig, path)


def _interval_bars(ax: Any, ys: Sequence[int], intervals: Sequence[Interval], scale: float, colour: str,
                   label: str) -> None:  # fmt: skip
    est = [i.estimate * scale for i in intervals]
    low = [(i.estimate - i.low) * scale if i.defined else 0.0 for i in intervals]
    high = [(i.high - i.estimate) * scale if i.defined else 0.0 for i in intervals]
    ax.errorbar(est, list(ys), xerr=[low, high], fmt="o", color=colour, capsize=3, label=label)
    ax.grid(axis="x", alpha=0.3)


def _heatmap_grid(results: Mapping[str, Any], panels: Sequence[tuple[str, list[list[float]], float]], title: str,
                  path: Path) -> None:  # fmt: skip
    """A grid (at most 4 columns) of domain x expert routing tables with one labelled colour bar."""
    plt = pyplot()
    domains = results["data"]["domains"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.2, 2.9 * rows + 0.6), squeeze=False,
                             layout="constrained")  # fmt: skip
    image = None
    for ax, (name, table, mi) in zip(axes.flat, panels):
        image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{name}\nMI {mi:.2f} bits", fontsize=9)
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        ax.set_xticks(range(len(table[0])))
        ax.set_xlabel("expert", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="mean routing weight (row sums to 1)")
    fig.suptitle(plot_title(results, title))
    save_figure(fig, path)


def write_figures(results: Mapping[str, Any], directory: str | Path) -> None:
    """``accuracy.png``, ``routing_smear.png`` and ``routing_methods.png`` (the last two when routing was kept)."""
    directory = Path(directory)
    _plot_accuracy(results, directory / "accuracy.png")
    first = results["config"]["seeds"][0]
    kept = _kept_routing(results)
    if "smear" in kept:
        run = kept["smear"]
        panels = [(site, table, run["domain_expert_mi_bits"][site]) for site, table in run["routing"].items()]
        _heatmap_grid(results, panels, f"SMEAR: routing per domain at every site (test images, seed {first})",
                      directory / "routing_smear.png")  # fmt: skip
    if kept:
        site = list(next(iter(kept.values()))["routing"])[-1]
        panels = [(m, r["routing"][site], r["domain_expert_mi_bits"][site]) for m, r in kept.items()]
        _heatmap_grid(results, panels, f"routing per domain at the last site ({site}), seed {first}",
                      directory / "routing_methods.png")  # fmt: skip


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """``report.md`` and the figures in ``out``."""
    return write_markdown_report(results, out, SECTIONS, write_figures, figures=_figure_list(results),
                                 title="SMEAR: merged-expert adapters vs routing baselines (multi-domain digits)")
