"""Report of ``moekit reproduce mcsmoe``: sections for ``report.md`` and for ``docs/mcsmoe.md``'s generated
blocks (``SECTIONS``), figures (``write_figures``). Every number comes from the results dict: held-out bits
per byte per seed (sum of bits / sum of bytes over its documents), means with 95% t-intervals over seeds,
comparisons paired by seed, and per seed a BCa bootstrap over documents of the same difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..confidence import Interval, bootstrap_interval, mean_interval, paired_difference
from ..reporting import markdown_table, save_figure
from .report_common import (
    cell, Claim, claims_table, is_smoke, mean_cell, plot_title, pyplot, report_sections, write_markdown_report
)

__all__ = ["SECTIONS", "labels", "bpb", "paired", "per_seed_difference", "claims", "costs", "write_figures",
           "write_report"]  # fmt: skip

#: the paper's claims that this run tests: (model A, model B, statement); each says A has lower bits per byte
CLAIMED = (
    ("msmoe", "prune", "M-SMoE beats pruning to the dominant experts"),
    ("msmoe", "uniform", "M-SMoE beats uniform averaging of the same groups"),
    ("msmoe", "random", "M-SMoE beats random grouping"),
    ("msmoe", "no_align", "permutation alignment helps (M-SMoE beats it without alignment)"),
    ("msmoe", "uniform_budget", "the adaptive (global) budget helps (M-SMoE beats a uniform per-layer budget)"),
    ("msmoe", "expert_output", "router-logit similarity groups better than expert-output similarity"),
)

#: what merging and compression cost, step-matched: (model A, model B, statement); each says A is worse
COSTS = (
    ("msmoe", "control", "merging costs held-out quality (M-SMoE vs the no-merge control)"),
    ("mcsmoe", "msmoe", "compression on top of merging costs quality (MC-SMoE vs M-SMoE)"),
    ("mcsmoe", "control", "MC-SMoE costs quality against the no-merge control"),
)


def labels(results: Mapping[str, Any]) -> dict[str, str]:
    """Display label of every scored model."""
    return {**results["controls"], "msmoe_merge_only": "M-SMoE, merge only (no recovery)", **results["variants"]}


def bpb(seed: Mapping[str, Any], name: str) -> float:
    """Held-out bits per byte of model ``name`` in one seed's record."""
    return float(sum(seed["models"][name]["bits"]) / sum(seed["bytes"]))


def _values(results: Mapping[str, Any], name: str) -> list[float]:
    return [bpb(s, name) for s in results["seeds"]]


def paired(results: Mapping[str, Any], a: str, b: str) -> Interval:
    """Interval of bpb(a) - bpb(b), paired by seed (t over seeds)."""
    return paired_difference(_values(results, a), _values(results, b))


def _difference(na: np.ndarray, nb: np.ndarray, d: np.ndarray, axis: int = -1) -> Any:
    return (na.sum(axis=axis) - nb.sum(axis=axis)) / d.sum(axis=axis)


def per_seed_difference(seed: Mapping[str, Any], a: str, b: str, *, n_resamples: int = 1999) -> Interval:
    """bpb(a) - bpb(b) in one seed with a BCa bootstrap over its held-out documents (resampled together)."""
    models = seed["models"]
    return bootstrap_interval(models[a]["bits"], models[b]["bits"], seed["bytes"], statistic=_difference,
                              n_resamples=n_resamples, seed=int(seed["seed"]))  # fmt: skip


def _has(results: Mapping[str, Any], *names: str) -> bool:
    return all(n in results["models"] for n in names)


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The paper's claims this run can check (both models scored)."""
    return [Claim(s, paired(results, a, b), "negative", spec=".4f", unit="bits/byte")
            for a, b, s in CLAIMED if _has(results, a, b)]  # fmt: skip


def costs(results: Mapping[str, Any]) -> list[Claim]:
    """What merging and compression cost (A worse than B: a positive difference)."""
    return [Claim(s, paired(results, a, b), "positive", spec=".4f", unit="bits/byte")
            for a, b, s in COSTS if _has(results, a, b)]  # fmt: skip


# ---------------------------------------------------------------- sections


def _setup(results: Mapping[str, Any], **_: str) -> str:
    cfg, seeds = results["config"], results["seeds"]
    s0 = seeds[0]
    merged = cfg["depth"] - (1 if cfg["keep_first"] else 0)
    anchor = {"first": "each group's lowest-id member (as the official code)",
              "dominant": "each group's dominant expert"}.get(cfg["anchor"], f"expert {cfg['anchor']}")  # fmt: skip
    return (
        f"{len(seeds)} seeds ({', '.join(str(s['seed']) for s in seeds)}); each seed draws a new split of the "
        f"Python standard library's source files and trains a new model. Held-out text: {cfg['test_files']} files "
        f"drawn per seed (never used for training or calibration), each scored on a {cfg['doc_bytes']}-byte span at "
        f"a seeded offset ({sum(s0['bytes'])} predicted bytes in seed {s0['seed']}); training text: the other "
        f"{s0['train_files']} files ({s0['train_bytes']} bytes). Model: a byte-level MoE LM, {cfg['depth']} layers, "
        f"dim {cfg['dim']}, {cfg['heads']} heads, {cfg['num_experts']} SwiGLU experts of hidden {cfg['hidden']} per "
        f"layer, top-{cfg['k']}, Switch balancing loss {cfg['aux_switch']}; trained {cfg['train_steps']} AdamW steps "
        f"(lr {cfg['lr']}, batch {cfg['batch_size']} x {cfg['seq_len']} bytes). Merging: {cfg['calib_sequences']} "
        f"calibration sequences from the training text; the first MoE layer is "
        f"{'kept whole (as in the paper)' if cfg['keep_first'] else 'merged too'}; the {merged} merged layer(s) get an "
        f"average of {cfg['experts']} experts each (a global budget unless noted), exact form (router unchanged, "
        f"merged experts shared); alignment anchor: {anchor}. Every variant, and the no-merge control, then gets "
        f"the same {cfg['recovery_steps']} recovery steps on the same batches: LM loss + {cfg['alpha']} x KL "
        f"(T = {cfg['temperature']}) to the unmerged model, routers frozen, lr {cfg['recovery_lr']}. MC-SMoE "
        f"replaces every expert bank of the M-SMoE merge (the unmerged first layer's too) by rank-{cfg['rank']} "
        f"factors plus a sparse residual whose rows are pruned to {cfg['final_ratio']:.0%} during those same steps "
        "(one global threshold), then packed (only kept rows stored). "
        "Scoring: `moekit.evaluation.evaluate_perplexity` (rolling windows of the model's context).\n"
    )


def _layers(results: Mapping[str, Any], name: str) -> str:
    counts = np.array([s["models"][name]["experts_per_layer"] for s in results["seeds"]], dtype=float)
    return ", ".join(f"{v:g}" for v in np.round(counts.mean(0), 1))


def _mean(results: Mapping[str, Any], name: str, key: str) -> float:
    return float(np.mean([s["models"][name][key] for s in results["seeds"]]))


def _results(results: Mapping[str, Any], **_: str) -> str:
    names, lab = results["models"], labels(results)
    headers = ["model", "held-out bits/byte [95% CI]", "vs full SMoE", "vs no-merge control", "experts per layer",
               "params", "expert params", "MFLOPs/token", "checkpoint MB"]  # fmt: skip
    rows = []
    for name in names:
        rows.append([
            lab[name], mean_cell(_values(results, name), spec=".4f"),
            "—" if name == "full" else cell(paired(results, name, "full"), spec=".4f"),
            "—" if name in ("full", "control") else cell(paired(results, name, "control"), spec=".4f"),
            _layers(results, name), f"{_mean(results, name, 'params') / 1e3:.1f}k",
            f"{_mean(results, name, 'expert_params') / 1e3:.1f}k", f"{_mean(results, name, 'flops_per_token') / 1e6:.3f}",
            f"{_mean(results, name, 'checkpoint_bytes') / 2**20:.3f}",
        ])  # fmt: skip
    n = len(results["seeds"])
    return (
        markdown_table(headers, rows)
        + f"\nBits per byte: mean over {n} seed(s) with a 95% t-interval; the two difference columns are paired by "
        "seed (negative: fewer bits than the reference). Sizes are measured on the run's models (means over seeds; "
        "with a global budget the layers' counts and MC-SMoE's kept rows differ between seeds): parameters as "
        "stored (pruned residual rows not counted), FLOPs per token with k expert runs, checkpoint = "
        "`model.safetensors` of `save_checkpoint`.\n"
    )


def _per_seed_table(results: Mapping[str, Any], pairs: Sequence[tuple[str, str, str]]) -> str:
    seeds, lab = results["seeds"], labels(results)
    rows = []
    for a, b, _ in pairs:
        if _has(results, a, b):
            rows.append([f"{lab[a]} − {lab[b]}"] + [cell(per_seed_difference(s, a, b), spec=".4f") for s in seeds])
    return markdown_table(["bits/byte difference", *[f"seed {s['seed']}" for s in seeds]], rows)


def _comparisons(results: Mapping[str, Any], **_: str) -> str:
    smoke = is_smoke(results)
    n_docs = len(results["seeds"][0]["documents"])
    text = ("The paper's claims, each from the held-out bits per byte of M-SMoE minus the other model, paired by "
            "seed (claimed: negative):\n\n")  # fmt: skip
    checked = claims(results)
    text += claims_table(checked, smoke=smoke) if checked else "(this run lacks M-SMoE or every compared variant)\n"
    paid = costs(results)
    if paid:
        text += ("\nWhat merging and compressing cost, step-matched (the paper reports small losses; here the "
                 "statement is that there *is* a loss, i.e. a positive difference):\n\n" + claims_table(paid, smoke=smoke))  # fmt: skip
    text += (f"\nThe same differences within each seed, with a BCa bootstrap over its {n_docs} held-out documents "
             "(it shows how consistent the seeds are; the verdicts above rest on the seed-level intervals):\n\n"
             + _per_seed_table(results, CLAIMED + COSTS))  # fmt: skip
    if _has(results, "msmoe", "msmoe_merge_only"):
        rec = paired(results, "msmoe", "msmoe_merge_only")
        text += (f"\nRecovery itself: M-SMoE after recovery minus the same merge before it: {cell(rec, spec='.4f')} "
                 f"bits/byte (n = {rec.n}).\n")  # fmt: skip
    return text


def _timing(results: Mapping[str, Any], **_: str) -> str:
    seeds = results["timing"]["seeds"]
    lab = labels(results)
    rows = [["train the SMoE", f"{np.mean([t['train_s'] for t in seeds.values()]):.1f}", "—", "—"]]
    for name in results["models"]:
        def mean(key: str) -> str:
            vals = [t[f"{name}/{key}"] for t in seeds.values() if f"{name}/{key}" in t]
            return f"{np.mean(vals):.2f}" if vals else "—"

        rows.append([lab[name], mean("merge_s"), mean("recover_s"), mean("eval_s")])
    return (
        markdown_table(["model", "merge s", "recovery s", "scoring s"], rows)
        + "\nMeans over seeds, wall-clock on the machine named above (shared with other jobs: compare roughly).\n"
    )


def _figure_list(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("bpb.png", "Held-out bits per byte per model, and M-SMoE's paired differences"),
            ("size_quality.png", "Expert parameters and checkpoint size against held-out bits per byte, relative to the no-merge control")]  # fmt: skip




SECTIONS = report_sections(setup=_setup, results=_results, comparisons=_comparisons, timing=_timing,
                           claims=lambda results: claims(results) + costs(results), figures=_figure_list)


# ---------------------------------------------------------------- figures


def _errorbars(ax: Any, ys: Sequence[float], intervals: Sequence[Interval], colour: str, label: str) -> None:
    est = [i.estimate for i in intervals]
    low = [i.estimate - i.low if i.defined else 0.0 for i in intervals]
    high = [i.high - i.estimate if i.defined else 0.0 for i in intervals]
    ax.errorbar(est, list(ys), xerr=[low, high], fmt="o", color=colour, capsize=3, label=label)
    ax.grid(axis="x", alpha=0.3)


def _plot_bpb(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    names, lab = results["models"], labels(results)
    others = [b for a, b, _ in CLAIMED + COSTS[:1] if a == "msmoe" and _has(results, a, b)]
    extra = [(a, b) for a, b, _ in COSTS[1:] if _has(results, a, b)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(names) + 2.2), layout="constrained")
    ax = axes[0]
    ys = list(range(len(names)))[::-1]
    _errorbars(ax, ys, [mean_interval(_values(results, n)) for n in names], "tab:blue", "mean over seeds, 95% CI")
    for y, n in zip(ys, names):
        ax.scatter(_values(results, n), [y] * len(results["seeds"]), s=10, color="gray", alpha=0.6,
                   label="one seed" if n == names[0] else None)  # fmt: skip
    ax.set_yticks(ys, [lab[n] for n in names], fontsize=8)
    ax.set_xlabel("held-out bits per byte (lower is better)")
    ax.set_title("held-out bits per byte")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize=7)
    ax = axes[1]
    pairs = [("msmoe", b) for b in others] + extra
    ys = list(range(len(pairs)))[::-1]
    _errorbars(ax, ys, [paired(results, a, b) for a, b in pairs], "tab:orange", "paired over seeds, 95% CI")
    ax.axvline(0, color="black", lw=1, ls="--", label="no difference")
    ax.set_yticks(ys, [f"{lab[a].split(' (')[0]} − {lab[b].split(' (')[0]}" for a, b in pairs], fontsize=8)
    ax.set_xlabel("difference in bits per byte (left of the dashed line: the first model is better)")
    ax.set_title("paired differences")
    ax.legend(loc="best", fontsize=7)
    fig.suptitle(plot_title(results, f"MC-SMoE on a byte-level MoE LM, {len(results['seeds'])} seed(s)"))
    save_figure(fig, path)


def _plot_size(results: Mapping[str, Any], path: Path) -> None:
    plt = pyplot()
    names, lab = results["models"], labels(results)
    markers = "os^vD<>ph*P"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for ax, key, scale, xlabel in ((axes[0], "expert_params", 1e3, "expert parameters (thousands)"),
                                   (axes[1], "checkpoint_bytes", 2**20, "checkpoint MB (model.safetensors)")):  # fmt: skip
        for i, name in enumerate(names):
            diff = paired(results, name, "control")
            err = [[diff.estimate - diff.low], [diff.high - diff.estimate]] if diff.defined else None
            ax.errorbar([_mean(results, name, key) / scale], [diff.estimate], yerr=err, capsize=3, label=lab[name],
                        fmt=markers[i % len(markers)], color=plt.get_cmap("tab20")(i % 20))  # fmt: skip
        ax.axhline(0, color="black", lw=1, ls="--", label="as good as the no-merge control")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits/byte minus the no-merge control\n(paired over seeds, 95% CI)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(plot_title(results, "size against quality, relative to the step-matched no-merge control "
                            "(lower left is better)"))  # fmt: skip
    save_figure(fig, path)


def write_figures(results: Mapping[str, Any], directory: str | Path) -> None:
    """``bpb.png`` and ``size_quality.png``."""
    directory = Path(directory)
    _plot_bpb(results, directory / "bpb.png")
    _plot_size(results, directory / "size_quality.png")


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """``report.md`` and the figures in ``out``."""
    return write_markdown_report(results, out, SECTIONS, write_figures, figures=_figure_list(results),
                                 title="MC-SMoE: merging and compressing a byte-level MoE language model")
