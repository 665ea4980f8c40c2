"""Report of ``moekit reproduce comet``: the paper's selection statistic per replicate, paired comparisons
across replicates with 95% intervals and verdicts, tuning curves with bootstrap bands, per-expert
utilisation. ``SECTIONS`` render ``report.md`` and ``docs/comet.md``'s generated blocks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..confidence import Interval, mean_interval, paired_difference
from ..reporting import markdown_table, save_figure
from .report_common import (
    cell, Claim, claims_table, is_smoke, plot_title, pyplot, report_sections, write_markdown_report
)

__all__ = [
    "SECTIONS",
    "is_sparse_trial",
    "selected",
    "replicate_scores",
    "expected_best_curve",
    "curve_band",
    "trials_to_match",
    "claims",
    "write_figures",
    "write_report",
]

#: the paper's claims (abstract): COMET+ beats these gates
CLAIMED_BASELINES = {"topk": "top-k", "hash": "hash routing", "dselect": "DSelect-k"}
#: local search reduces the tuning budget of these gates (abstract: "with Top-k and Hash")
BUDGET_CLAIMS = ("topk", "hash")


def is_sparse_trial(trial: Mapping[str, Any], threshold: float) -> bool:
    """Whether every task gate routed at least ``threshold`` of the *validation* examples to <= k experts."""
    return trial["val"] is not None and min(trial["val"]["fraction_hard"]) >= threshold


def selected(trials: Sequence[Mapping[str, Any]], fraction: float, *, sparse: float | None = None
             ) -> list[Mapping[str, Any]]:  # fmt: skip
    """The best ``max(1, ceil(fraction * N))`` of the N trials by validation loss; with ``sparse``, only
    trials that are k-sparse on validation at that threshold compete (fewer if fewer qualify)."""
    ok = [t for t in trials if t["test"] is not None and (sparse is None or is_sparse_trial(t, sparse))]
    return sorted(ok, key=lambda t: t["val_loss"])[: max(1, math.ceil(fraction * len(trials)))]


def _score(trial: Mapping[str, Any]) -> float:
    """A trial's test metric averaged over tasks."""
    metric = trial["test"]["metric"]
    return sum(metric) / len(metric)


def replicate_scores(dataset: Mapping[str, Any], gate: str, fraction: float, *, sparse: float | None = None
                     ) -> list[float | None]:  # fmt: skip
    """Per replicate: mean test metric of the selected trials (None when no trial qualifies)."""
    out: list[float | None] = []
    for rep in dataset["replicates"]:
        top = selected(rep["trials"][gate], fraction, sparse=sparse)
        out.append(sum(_score(t) for t in top) / len(top) if top else None)
    return out


def expected_best_curve(values: Sequence[float]) -> list[float]:
    """``E[min of m trials drawn without replacement]`` for m = 1..N, exactly: with values sorted
    ascending, the i-th smallest (1-based) is the minimum with probability ``C(N-i, m-1) / C(N, m)``."""
    v = sorted(values)
    N = len(v)
    curve = []
    for m in range(1, N + 1):
        total = math.comb(N, m)
        curve.append(sum(value * math.comb(N - i, m - 1) / total for i, value in enumerate(v, start=1)))
    return curve


def _curve_matrix(values_RN: np.ndarray) -> np.ndarray:
    """Exact expected-best curves of many samples at once: ``[R, N] -> [R, N]`` (row r, column m-1)."""
    R, N = values_RN.shape
    v = np.sort(values_RN, axis=1)
    i = np.arange(1, N + 1)
    weights = np.array([[math.comb(N - a, m - 1) / math.comb(N, m) for a in i] for m in i])  # [m, i]
    return v @ weights.T


def _val_losses(dataset: Mapping[str, Any], gate: str) -> np.ndarray | None:
    """``[replicates, trials]`` validation losses (None if any trial diverged)."""
    rows = [[t["val_loss"] for t in rep["trials"][gate]] for rep in dataset["replicates"]]
    if any(v is None for row in rows for v in row):
        return None
    return np.array(rows, dtype=np.float64)


def curve_band(dataset: Mapping[str, Any], gate: str, *, resamples: int = 1000, level: float = 0.95,
               seed: int = 0) -> tuple[list[float], list[float], list[float]] | None:  # fmt: skip
    """The tuning curve (expected best validation loss after m trials, mean over replicates) and its
    bootstrap band: trials resampled with replacement within each replicate, ``resamples`` times."""
    losses = _val_losses(dataset, gate)
    if losses is None:
        return None
    R, N = losses.shape
    mean = _curve_matrix(losses).mean(0)
    rng = np.random.default_rng(seed)
    draws = losses[np.arange(R)[None, :, None], rng.integers(0, N, size=(resamples, R, N))]  # [B, R, N]
    boot = _curve_matrix(draws.reshape(resamples * R, N)).reshape(resamples, R, N).mean(1)
    low, high = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2], axis=0)
    return mean.tolist(), low.tolist(), high.tolist()


def trials_to_match(curve: Sequence[float], target: float) -> int | None:
    """Fewest trials whose expected best reaches ``target`` (None if never)."""
    return next((m for m, value in enumerate(curve, start=1) if value <= target), None)


def _paired_scores(a: Sequence[float | None], b: Sequence[float | None]) -> Interval | None:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return paired_difference([x for x, _ in pairs], [y for _, y in pairs]) if pairs else None


def _higher_is_better(dataset: Mapping[str, Any]) -> bool:
    return dataset["metric"] == "accuracy"


def _scale(dataset: Mapping[str, Any]) -> tuple[float, str, str]:
    return (100.0, "accuracy points", ".1f") if _higher_is_better(dataset) else (1.0, "MSE", ".3f")


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The paper's claims per data set: COMET+ beats top-k, hash and DSelect-k (k-sparse trials, selected
    on validation); local search lowers top-k's and hash's tuning curve (mean gap over m = 1..N)."""
    cfg = results["config"]
    out = []
    for name, d in results["datasets"].items():
        gates = d["replicates"][0]["trials"]
        scale, unit, spec = _scale(d)
        claimed = "positive" if _higher_is_better(d) else "negative"
        if "comet+" in gates:
            comet = replicate_scores(d, "comet+", cfg["top_fraction"], sparse=cfg["sparse_threshold"])
            for base, label in CLAIMED_BASELINES.items():
                if base in gates:
                    other = replicate_scores(d, base, cfg["top_fraction"], sparse=cfg["sparse_threshold"])
                    diff = _paired_scores(comet, other)
                    if diff is not None:
                        out.append(Claim(f"{name}: COMET+ beats {label} (test {d['metric']})", diff, claimed,
                                         scale=scale, spec=spec, unit=unit))  # fmt: skip
        for base in BUDGET_CLAIMS:
            if base in gates and f"{base}+" in gates:
                plain, plus = _val_losses(d, base), _val_losses(d, f"{base}+")
                if plain is not None and plus is not None:
                    gap = (_curve_matrix(plus) - _curve_matrix(plain)).mean(1)
                    out.append(Claim(f"{name}: local search lowers {base}'s tuning curve (mean over m of "
                                     "E[best val loss], + minus plain)", mean_interval(gap), "negative",
                                     spec=".3f", unit="val loss"))  # fmt: skip
    return out


# ---------------------------------------------------------------- sections


def _setup(results: Mapping[str, Any], **_: str) -> str:
    cfg = results["config"]
    lines = []
    for name, d in results["datasets"].items():
        sizes = d["replicates"][0]["sizes"]
        tasks = ", ".join(f"{t['name']} ({t['kind']})" for t in d["tasks"])
        lines.append(f"- **{name}**: {d['num_experts']} experts, k = {d['k']} (hash: 1), {d['features']} input "
                     f"features, tasks {tasks}; train/validation/test = {'/'.join(map(str, sizes))}.")  # fmt: skip
    top = max(1, math.ceil(cfg["top_fraction"] * cfg["trials"]))
    return (
        "Multi-gate MoE (one gate and tower per task, shared MLP experts of hidden width "
        f"{cfg['expert_hidden']} and output {cfg['expert_dim']}). Data sets:\n\n" + "\n".join(lines) + "\n\n"
        f"{len(cfg['replicates'])} search replicates (seeds {', '.join(map(str, cfg['replicates']))}); each draws a "
        f"new data set and {cfg['trials']} hyperparameter draws shared by every gate: learning rate log-uniform in "
        f"{cfg['lr_range']} (every gate), gamma log-uniform in {cfg['gamma_range']} (plain DSelect-k and COMET; "
        f"their \"+\" variants fix gamma = {cfg['plus_gamma']}, as the paper fixes it for COMET+), entropy "
        f"coefficient log-uniform in {cfg['entropy_range']} (DSelect-k, COMET), and the fraction of training that "
        f"learns the permutation, uniform in {cfg['local_search_range']} (\"+\" gates; then rounded by the "
        f"Hungarian algorithm and frozen). Trial i of every gate also shares its initialisation seed. Each trial: "
        f"Adam, batch {cfg['batch_size']}, {cfg['epochs']} epochs, the epoch with the lowest validation loss kept. "
        f"Top-k has no noise and no balancing loss; hash routing sends each example to one fixed random expert "
        f"(k = 1, the paper's Hash-r); softmax is dense and has no \"+\" variant.\n\n"
        f"Selection (the paper's statistic at this budget): per replicate, the mean test metric of the best "
        f"{cfg['top_fraction']:.0%} of the {cfg['trials']} trials by validation loss (here {top} trial). "
        f"\"k-sparse\" trials are those whose every task gate routes at least {cfg['sparse_threshold']:.0%} of the "
        f"*validation* examples to at most k experts; the claims compare k-sparse selections (top-k and hash are "
        f"always k-sparse).\n"
    )


def _results(results: Mapping[str, Any], **_: str) -> str:
    cfg = results["config"]
    parts = []
    for name, d in results["datasets"].items():
        scale, unit, spec = _scale(d)
        headers = ["gate", f"test {d['metric']} [95% CI], all trials", f"k-sparse trials: test {d['metric']} [95% CI]",
                   "k-sparse trials", "experts run / example", "E[best val loss], all trials"]  # fmt: skip
        rows = []
        for gate in d["replicates"][0]["trials"]:
            all_scores = replicate_scores(d, gate, cfg["top_fraction"])
            sparse_scores = replicate_scores(d, gate, cfg["top_fraction"], sparse=cfg["sparse_threshold"])
            trials = [t for rep in d["replicates"] for t in rep["trials"][gate]]
            n_sparse = sum(is_sparse_trial(t, cfg["sparse_threshold"]) for t in trials)
            run = [sum(t["test"]["experts_per_example"]) / len(t["test"]["experts_per_example"])
                   for rep in d["replicates"] for t in selected(rep["trials"][gate], cfg["top_fraction"])]  # fmt: skip
            band = curve_band(d, gate)
            rows.append([
                f"`{gate}`", _scores_cell(all_scores, scale, spec), _scores_cell(sparse_scores, scale, spec),
                f"{n_sparse}/{len(trials)}", f"{sum(run) / len(run):.2f}" if run else "—",
                f"{band[0][-1]:.4f}" if band else "—",
            ])  # fmt: skip
        parts.append(f"**{name}** ({d['metric']}; {'higher' if _higher_is_better(d) else 'lower'} is better)\n\n"
                     + markdown_table(headers, rows))  # fmt: skip
    return "\n".join(parts) + (
        f"\nMetric cells: mean over the {len(cfg['replicates'])} replicates of the selected trial's test metric "
        "(accuracy in %), with a 95% t-interval. Experts run: mean per example over the task gates of the selected "
        "trials (all trials). E[best val loss]: expected best validation loss after all trials of a replicate, "
        "mean over replicates.\n"
    )


def _scores_cell(scores: Sequence[float | None], scale: float, spec: str) -> str:
    vals = [s for s in scores if s is not None]
    if not vals:
        return "—"
    missing = len(scores) - len(vals)
    note = f" ({missing} replicate(s) without one)" if missing else ""
    return cell(mean_interval(vals), scale=scale, spec=spec) + note


def _not_run(gates: Sequence[str]) -> str:
    """A note naming the claims' gates this run left out (nothing when every one ran)."""
    if "comet+" not in gates:
        return "\nCOMET+ not run here, so none of its claims is compared.\n"
    missing = [label for base, label in CLAIMED_BASELINES.items() if base not in gates]
    return f"\nBaselines of the claims not run here, so not compared: {', '.join(missing)}.\n" if missing else ""


def _comparisons(results: Mapping[str, Any], **_: str) -> str:
    checked = claims(results)
    text = ("The paper's claims, each from differences paired by replicate (same data, same hyperparameter "
            "draws):\n\n")  # fmt: skip
    none = "(no claim checked: this run lacks their gates, or k-sparse selections of them)\n"
    text += claims_table(checked, smoke=is_smoke(results)) if checked else none
    text += _not_run(results["config"]["gates"])
    rows = []
    for name, d in results["datasets"].items():
        gates = d["replicates"][0]["trials"]
        for base in ("topk", "hash", "dselect", "comet"):
            if base not in gates or f"{base}+" not in gates:
                continue
            band_plain, band_plus = curve_band(d, base), curve_band(d, f"{base}+")
            if band_plain is None or band_plus is None:
                continue
            N = len(band_plain[0])
            m_plus = trials_to_match(band_plus[0], band_plain[0][-1])
            m_plain = trials_to_match(band_plain[0], band_plus[0][-1])
            rows.append([name, base, f"{band_plain[0][0]:.4f}", f"{band_plus[0][0]:.4f}", f"{band_plain[0][-1]:.4f}",
                         f"{band_plus[0][-1]:.4f}", "never" if m_plus is None else f"{m_plus} of {N}",
                         "never" if m_plain is None else f"{m_plain} of {N}"])  # fmt: skip
    if rows:
        text += ("\nTuning curves (expected best validation loss, mean over replicates) at one trial and at the whole "
                 "budget, and the trials each variant needs to reach the other's whole-budget value:\n\n"
                 + markdown_table(["data", "gate", "plain, m=1", "+, m=1", "plain, m=N", "+, m=N",
                                   "+ reaches plain's m=N after", "plain reaches +'s m=N after"], rows))  # fmt: skip
    return text


def _utilisation(results: Mapping[str, Any], **_: str) -> str:
    cfg = results["config"]
    rows = []
    for name, d in results["datasets"].items():
        for gate in d["replicates"][0]["trials"]:
            shares = []
            for rep in d["replicates"]:
                top = selected(rep["trials"][gate], cfg["top_fraction"])
                for weights in top[0]["test"]["weight_per_expert"] if top else []:
                    total = sum(weights) or 1.0
                    shares.append([w / total for w in weights])
            if not shares:
                continue
            ran = [sum(s > 0.001 for s in row) for row in shares]
            rows.append([name, f"`{gate}`", f"{max(max(s) for s in shares):.2f}", f"{min(min(s) for s in shares):.3f}",
                         f"{sum(ran) / len(ran):.1f} of {d['num_experts']}"])  # fmt: skip
    return (markdown_table(["data", "gate", "largest share of one expert", "smallest share",
                            "experts with > 0.1% of the gate weight"], rows)  # fmt: skip
            + "\nShares of the test gate weight per expert, over the task gates of every replicate's selected trial.\n")


def _timing(results: Mapping[str, Any], **_: str) -> str:
    search = results["timing"]["search_s"]
    rows = []
    for name, d in results["datasets"].items():
        for gate in d["replicates"][0]["trials"]:
            t = [search[f"{name}/r{rep['seed']}/{gate}"] for rep in d["replicates"]]
            rows.append([name, f"`{gate}`", f"{sum(t) / len(t):.0f}"])
    return markdown_table(["data", "gate", "search s per replicate"], rows) + (
        "\nWall-clock on the machine named above (shared with other jobs).\n"
    )


def _figure_list(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    figures = [("budget.png", "Tuning curves with 95% bootstrap bands")]
    figures += [(f"utilisation_{n}.png", f"Expert utilisation, {n}") for n in results["datasets"]]
    return figures


SECTIONS = report_sections(setup=_setup, results=_results, comparisons=_comparisons, utilisation=_utilisation,
                           timing=_timing, claims=claims, figures=_figure_list)  # fmt: skip


# ---------------------------------------------------------------- figures


def _plot_curves(results: Mapping[str, Any], path: Path) -> None:
    """One panel per (data set, base gate): plain and "+" curves with their bands."""
    plt = pyplot()
    panels = []
    for name, d in results["datasets"].items():
        gates = list(d["replicates"][0]["trials"])
        for base in dict.fromkeys(g.rstrip("+") for g in gates):
            panels.append((name, base, [g for g in (base, f"{base}+") if g in gates]))
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.8), squeeze=False, layout="constrained")
    for ax, (name, base, gates) in zip(axes.flat, panels):
        d = results["datasets"][name]
        for gate, colour in zip(gates, ("tab:blue", "tab:orange")):
            band = curve_band(d, gate)
            if band is None:
                continue
            m = np.arange(1, len(band[0]) + 1)
            ax.plot(m, band[0], color=colour, label=gate)
            ax.fill_between(m, band[1], band[2], color=colour, alpha=0.25, label=f"{gate} 95% band")
        ax.set_title(f"{name}: {base}", fontsize=10)
        ax.set_xlabel("random-search trials m")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("E[best validation loss]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(plot_title(results, "tuning curves: expected best validation loss after m trials, mean over "
                                     "replicates (lower is better); bands: 95% bootstrap over trials"))
    save_figure(fig, path)


def _plot_utilisation(results: Mapping[str, Any], name: str, path: Path) -> None:
    plt = pyplot()
    cfg, d = results["config"], results["datasets"][name]
    rep = d["replicates"][0]
    labels, rows = [], []
    for gate, trials in rep["trials"].items():
        top = selected(trials, cfg["top_fraction"])
        for t, weights in enumerate(top[0]["test"]["weight_per_expert"] if top else []):
            total = sum(weights) or 1.0
            labels.append(f"{gate}, task {t + 1}")
            rows.append([w / total for w in weights])
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * d["num_experts"], 1.2 + 0.3 * len(rows)), layout="constrained")
    image = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(d["num_experts"]))
    ax.set_xlabel("expert")
    ax.set_title(plot_title(results, f"{name}: test gate weight per expert\n(selected trial, replicate {rep['seed']})"),
                 fontsize=10)  # fmt: skip
    fig.colorbar(image, ax=ax, label="share of the task gate's weight")
    save_figure(fig, path)


def write_figures(results: Mapping[str, Any], directory: str | Path) -> None:
    """``budget.png`` and ``utilisation_<dataset>.png``."""
    directory = Path(directory)
    _plot_curves(results, directory / "budget.png")
    for name in results["datasets"]:
        _plot_utilisation(results, name, directory / f"utilisation_{name}.png")


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """``report.md`` and the figures in ``out``."""
    return write_markdown_report(results, out, SECTIONS, write_figures, figures=_figure_list(results),
                                 title="COMET: sparse gates and permutation local search on multi-task data",
                                 order=("setup", "command", "results", "comparisons", "utilisation", "timing"))
