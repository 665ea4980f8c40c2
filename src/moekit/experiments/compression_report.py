"""Report of ``moekit reproduce compression``: sections for ``report.md`` and the generated blocks of
``docs/compression.md`` (``SECTIONS``), and figures. Every number comes from the results dict; every
comparison is a difference paired by seed (same trained model, calibration and evaluation items) with
a 95% t-interval, and each published claim gets its verdict from that interval."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ..confidence import Interval, mean_interval, paired_difference
from ..reporting import markdown_table, save_figure
from .report_common import (
    Claim, claims_table, is_smoke, mean_cell, plot_title, pyplot, report_sections, write_markdown_report
)

__all__ = ["SECTIONS", "value", "paired", "claims", "write_figures", "write_report"]

NONE = "none"
LABELS = {"bits_per_byte": "bits/byte", "acc": "choice acc %", "continuation_agreement": "agreement %",
          "repetition": "repetition %"}  # fmt: skip


#: the held-out perplexity metric of a run (``results["data"]["perplexity_metric"]``) and its unit
PERPLEXITY_UNITS = {"bits_per_byte": "bits/byte", "nll_per_token": "nats/token"}


def ppl(results: Mapping[str, Any]) -> str:
    """The run's perplexity metric: bits per byte on text (the default), nats per token on token ids."""
    return str(results.get("data", {}).get("perplexity_metric", "bits_per_byte"))


def ppl_unit(results: Mapping[str, Any]) -> str:
    return PERPLEXITY_UNITS[ppl(results)]


def value(row: Mapping[str, Any], metric: str) -> float:
    """The estimate of ``metric`` in ``row`` (NaN when the run has no such metric, e.g. choice on token ids)."""
    entry = row["metrics"].get(metric)
    return math.nan if entry is None else float(entry["estimate"])


def _rows(results: Mapping[str, Any], method: str, removed: float, recovery: bool) -> dict[int, Mapping[str, Any]]:
    want = 0.0 if method == NONE else removed
    return {r["seed"]: r for r in results["rows"]
            if r["method"] == method and r["recovery"] == recovery and (r["removed"] == want)}  # fmt: skip


def paired(results: Mapping[str, Any], a: tuple[str, float, bool], b: tuple[str, float, bool], metric: str) -> Interval:
    """Interval of ``metric(a) - metric(b)`` paired by seed; ``a``/``b`` = (method, removed, recovery); seeds
    without the metric (choice on token-id data) are left out."""
    ra, rb = _rows(results, *a), _rows(results, *b)
    pairs = [(value(ra[s], metric), value(rb[s], metric)) for s in ra if s in rb]
    pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return Interval(math.nan, math.nan, math.nan, 0, 0.95, "none")
    return paired_difference([x for x, _ in pairs], [y for _, y in pairs])


def _methods(results: Mapping[str, Any]) -> list[str]:
    return list(results["methods"])


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The papers' claims this run can check, at every removed fraction, without recovery (one-shot,
    as the papers report) -- bits/byte lower is better, accuracy and agreement higher. ``"ppl"`` claims are on
    the run's perplexity metric (``ppl``; their statements name its unit)."""
    methods, out, unit = set(_methods(results)), [], ppl_unit(results)
    for r in results["config"]["removed"]:
        pct = f"{r:.0%} removed, one-shot"

        def add(statement: str, a: str, b: str, metric: str, claimed: str, scale: float = 1.0, spec: str = ".3f",
                unit: str = "", r: float = r, pct: str = pct) -> None:  # fmt: skip
            if a in methods and b in methods:
                if metric == "ppl":
                    statement, metric = statement.replace("bits/byte", ppl_unit(results)), ppl(results)
                text, source = statement.rsplit(" (", 1)
                difference = paired(results, (a, r, False), (b, r, False), metric)
                if difference.n:  # choice accuracy on token-id data: none
                    out.append(Claim(f"{text} ({source.rstrip(')')}; {pct})", difference, claimed=claimed, scale=scale,
                                     spec=spec, unit=unit))  # fmt: skip

        add("REAP beats M-SMoE on held-out bits/byte (REAP)", "reap", "m-smoe", "ppl", "negative", unit=unit)
        add("REAP's next-token predictions stay closer to the original's than M-SMoE's, KL (REAP)", "reap", "m-smoe",
            "kl", "negative", 1.0, ".3f", "nats/token")
        add("REAP beats frequency pruning on bits/byte (REAP)", "reap", "frequency", "ppl", "negative", unit=unit)
        add("REAP beats EAN on bits/byte (REAP)", "reap", "ean", "ppl", "negative", unit=unit)
        add("HC-SMoE beats M-SMoE on multiple choice (HC-SMoE)", "hc-smoe", "m-smoe", "acc", "positive", 100, ".1f", "points")
        add("HC-SMoE beats REAP on multiple choice (REAP: MC favours merging)", "hc-smoe", "reap", "acc", "positive", 100,
            ".1f", "points")
        add("MoNE beats REAP on bits/byte (MoNE)", "mone", "reap", "ppl", "negative", unit=unit)
        add("NAEE beats frequency pruning on bits/byte (NAEE)", "nae", "frequency", "ppl", "negative", unit=unit)
        add("REAP beats random pruning on bits/byte (control)", "reap", "random", "ppl", "negative", unit=unit)
    return out


# ---------------------------------------------------------------- sections


def _setup(results: Mapping[str, Any], **_: str) -> str:
    cfg, data = results["config"], results["data"]
    ev = data["evaluation"]
    if cfg.get("model") is not None:
        return _setup_model(results)
    return (
        f"{len(cfg['seeds'])} seed(s) ({', '.join(map(str, cfg['seeds']))}); each trains a new byte-level MoE LM "
        f"(dim {cfg['dim']}, {cfg['depth']} layers, {cfg['num_experts']} GLU experts of hidden {cfg['hidden']}, "
        f"top-{cfg['k']}, context {cfg['seq_len']}) for {cfg['train_steps']} steps of batch {cfg['batch_size']} "
        f"on the training files of the Python standard library ({data['corpus']['train_bytes']:,} bytes, "
        f"{data['corpus']['train_files']} files). Calibration: {cfg['calib_sequences']} windows of the training "
        f"files. Evaluation: the first {len(ev['documents'])} held-out files (never trained or calibrated on; at "
        f"most {cfg['max_doc_bytes']} bytes each for bits/byte), {cfg['items']} next-line multiple-choice items "
        f"(3 distractors, chance 25%), {cfg['prompts']} prompts of {cfg['prompt_length']} bytes continued greedily "
        f"for {cfg['new_tokens']} tokens and compared with the seed's original model. Each method removes "
        f"{' and '.join(f'{r:.0%}' for r in cfg['removed'])} of every layer's experts (M-SMoE: the same total, "
        f"its global budget). Recovery: {cfg['recovery_steps']} steps of KD from the original model (alpha "
        f"{cfg['alpha']}, T {cfg['temperature']}, lr {cfg['recovery_lr']}, routers frozen) on the same batches for "
        f"every variant, the no-compression control included. Super experts protected for every method but "
        f"M-SMoE.\n"
    )


def _sources(sources: list[str], stdlib: str) -> str:
    return ", ".join(stdlib if s == "stdlib" else f"`{s}`" for s in sources)


def _setup_model(results: Mapping[str, Any]) -> str:
    """The setup of a ``--model`` run: which model, which calibration and evaluation data, no training."""
    cfg, data = results["config"], results["data"]
    model, ev, calib = data["model"], data["evaluation"], data["calibration"]
    counts = sorted(set(model["experts_per_block"].values()))
    first = next(iter(calib.values()))
    text = ev["documents"][0]["bytes"] is not None
    cut = f"; at most {cfg['max_doc_bytes']} bytes each" if text and cfg["max_doc_bytes"] else ""
    recovery = (f"Recovery: {cfg['recovery_steps']} steps of KD from the original model (alpha {cfg['alpha']}, T "
                f"{cfg['temperature']}, lr {cfg['recovery_lr']}, routers frozen) on the same random windows of the "
                "calibration text for every variant, the no-compression control included." if cfg["recovery_steps"] else
                "No recovery (Hugging Face models get none: KD recovery trains moekit models).")  # fmt: skip
    return (
        f"Model `{model['path']}` ({model.get('model_type') or model['kind']}, {model.get('parameters') or 0:,} "
        f"parameters, {len(model['experts_per_block'])} MoE blocks of {'/'.join(map(str, counts))} experts), not "
        f"trained here. {len(cfg['seeds'])} seed(s) ({', '.join(map(str, cfg['seeds']))}); each draws its own "
        f"calibration sample ({first['rows']} of {first['pool_rows']} sequences of "
        f"{_sources(first['sources'], 'the stdlib training files')}, tokens: {first['tokenizer']}) and its own "
        f"evaluation items. Evaluation: {len(ev['documents'])} documents of "
        f"{_sources(cfg['data'], 'the held-out stdlib files')} (never calibrated on{cut}; {ppl_unit(results)})"
        + (f", {cfg['items']} next-line multiple-choice items (3 distractors, chance 25%)" if text else "")
        + f", {cfg['prompts']} prompts continued greedily for {cfg['new_tokens']} tokens and compared with the "
        f"original model. Each method removes {' and '.join(f'{r:.0%}' for r in cfg['removed'])} of every MoE "
        f"block's experts (M-SMoE: the same total, its global budget) through `moekit compress`'s streamed "
        f"pipeline; every compressed model is reloaded from its directory for evaluation. {recovery} Super experts "
        f"protected for every method but M-SMoE.\n"
    )


def _results(results: Mapping[str, Any], **_: str) -> str:
    cfg, metric, unit = results["config"], ppl(results), ppl_unit(results)
    headers = ["method", "removed", "recovery", "experts/layer", f"{unit} [95% CI]", f"Δ {unit} vs control",
               "choice acc %", "KL to original", "agreement %", "repetition %", "form"]  # fmt: skip
    table = []
    for recovery in (False, True):
        for removed in [0.0, *cfg["removed"]]:
            for method in [NONE] if removed == 0.0 else _methods(results):
                rows = _rows(results, method, removed, recovery)
                if not rows:
                    continue
                rs = list(rows.values())
                delta = "—" if method == NONE else _diff(paired(results, (method, removed, recovery), (NONE, 0.0, recovery),
                                                                metric), spec=".3f")  # fmt: skip
                counts = sorted({tuple(r["experts_per_layer"]) for r in rs})
                table.append([
                    method if method != NONE else "no compression (control)", f"{removed:.0%}", "yes" if recovery else "no",
                    ", ".join("/".join(map(str, c)) for c in counts),
                    mean_cell([value(r, metric) for r in rs], spec=".3f"), delta,
                    mean_cell([value(r, "acc") for r in rs], scale=100), mean_cell([value(r, "kl") for r in rs], spec=".3f"),
                    mean_cell([value(r, "continuation_agreement") for r in rs], scale=100),
                    mean_cell([value(r, "repetition") for r in rs], scale=100), rs[0]["form"],
                ])  # fmt: skip
    note = ("\nMeans over seeds with 95% t-intervals; Δ is paired by seed against the control with the same "
            "recovery (so recovered variants are compared with a model that had the same extra training). "
            "KL: mean KL(original || model) of the next-token distributions over the prompt positions "
            "(held-out text, nats/token); agreement: share of greedy continuation tokens equal to the original's; "
            "repetition: repeated n-grams in the model's own continuation.\n")  # fmt: skip
    return markdown_table(headers, table) + note


def _against_original(results: Mapping[str, Any], **_: str) -> str:
    """Per seed, each variant minus the original on the same documents and items (``--model`` runs: the
    harness's paired bootstrap, so even one seed has intervals)."""
    from ..evaluation.report import format_interval

    metric, table = ppl(results), []
    for r in results["rows"]:
        paired_ = r.get("vs_original")
        if paired_ is None:
            continue
        cells = []
        for task, name in (("perplexity", metric), ("choice", "acc")):
            d = paired_.get(name)
            cells += [format_interval(task, name, d["difference"]), d["verdict"]] if d else ["—", "—"]
        table.append([r["method"] if r["method"] != NONE else "no compression (control)", f"{r['removed']:.0%}",
                      "yes" if r["recovery"] else "no", str(r["seed"]), *cells])  # fmt: skip
    headers = ["method", "removed", "recovery", "seed", f"Δ {ppl_unit(results)} [95% CI]", "verdict",
               "Δ choice acc [95% CI]", "verdict"]  # fmt: skip
    return markdown_table(headers, table) + (
        "\nModel minus the original on the same held-out documents (perplexity) and items (choice), BCa bootstrap "
        "intervals over them (`moekit.evaluation.compare_runs`); the verdict names the better of the two when the "
        "interval excludes 0.\n")  # fmt: skip


def _diff(interval: Interval, *, scale: float = 1.0, spec: str = ".2f") -> str:
    from .report_common import cell

    return cell(interval, scale=scale, spec=spec)


def _ranking(results: Mapping[str, Any], **_: str) -> str:
    """Per fraction and recovery: methods by mean perplexity metric (bits/byte), each against the best (paired)."""
    cfg, parts = results["config"], []
    for removed in cfg["removed"]:
        for recovery in (False, True):
            means, order = _ranked(results, removed, recovery)
            if not order:
                continue
            best = order[0]
            rows = []
            for m in order:
                d = paired(results, (m, removed, recovery), (best, removed, recovery), ppl(results))
                noise = "best" if m == best else ("within noise" if d.defined and d.low <= 0 <= d.high else
                                                   ("worse" if d.defined and d.low > 0 else "n too small"))  # fmt: skip
                rows.append([m, f"{means[m]:.3f}", "—" if m == best else _diff(d, spec=".3f"), noise])
            parts.append(f"**{removed:.0%} removed, {'after recovery' if recovery else 'one-shot'}**\n\n"
                         + markdown_table(["method", f"mean {ppl_unit(results)}", f"Δ vs {best} [95% CI]", "verdict"], rows))  # fmt: skip
    return "\n".join(parts)


def _ranked(results: Mapping[str, Any], removed: float, recovery: bool) -> tuple[dict[str, float], list[str]]:
    """Mean held-out perplexity metric (bits/byte) of every method at one setting, and the methods that have one, best first."""
    means = {m: _mean(results, m, removed, recovery) for m in _methods(results)}
    return means, sorted((m for m in means if not math.isnan(means[m])), key=lambda m: means[m])


def _summary(results: Mapping[str, Any], **_: str) -> str:
    """Plain sentences: per setting the best method on bits/byte, which are within noise of it, and
    where M-SMoE stands against REAP and HC-SMoE; then whether choice accuracy moved at all."""
    cfg, lines = results["config"], []
    for removed in cfg["removed"]:
        for recovery in (False, True):
            means, order = _ranked(results, removed, recovery)
            if not order:
                continue
            best, tied, worse = order[0], [], []
            for m in order[1:]:
                d = paired(results, (m, removed, recovery), (best, removed, recovery), ppl(results))
                (tied if not d.defined or d.low <= 0 else worse).append(f"{m} (+{d.estimate:.3f})")
            setting = f"{removed:.0%} removed, {'after recovery' if recovery else 'one-shot'}"
            line = (f"- {setting}: lowest {ppl_unit(results)} **{best}** ({means[best]:.3f}); within noise of it: "
                    f"{', '.join(tied) or 'none'}; worse beyond noise: {', '.join(worse) or 'none'}.")  # fmt: skip
            if "m-smoe" in means:
                parts = []
                for other in ("reap", "hc-smoe"):
                    if other in means:
                        d = paired(results, ("m-smoe", removed, recovery), (other, removed, recovery), ppl(results))
                        side = "within noise" if not d.defined or d.low <= 0 <= d.high else ("worse" if d.low > 0 else "better")
                        parts.append(f"{d.estimate:+.3f} vs {other} ({side})")
                line += f" M-SMoE: {'; '.join(parts)}."
            lines.append(line)
    moved = []
    for removed in cfg["removed"]:
        for m in _methods(results):
            d = paired(results, (m, removed, False), (NONE, 0.0, False), "acc")
            if d.defined and (d.low > 0 or d.high < 0):
                moved.append(f"{m} at {removed:.0%} ({d.estimate * 100:+.1f} points)")
    lines.append("- Multiple choice (one-shot, against the control): "
                 + (f"beyond noise only {', '.join(moved)}." if moved else "no method moves accuracy beyond noise."))  # fmt: skip
    return "\n".join(lines) + "\n"


def _mean(results: Mapping[str, Any], method: str, removed: float, recovery: bool) -> float:
    rows = _rows(results, method, removed, recovery)
    return sum(value(r, ppl(results)) for r in rows.values()) / len(rows) if rows else math.nan


def _protected(results: Mapping[str, Any], **_: str) -> str:
    seen: dict[int, Any] = {}
    for r in results["rows"]:
        if r.get("protected") and r["seed"] not in seen:
            seen[r["seed"]] = {k: v for k, v in r["protected"].items() if v}
    if not seen:
        return "No super experts were protected.\n"
    return "".join(f"- seed {s}: " + (", ".join(f"{b} expert(s) {v}" for b, v in p.items()) or "none") + "\n"
                   for s, p in sorted(seen.items()))  # fmt: skip


def _timing(results: Mapping[str, Any], **_: str) -> str:
    t = results.get("timing", {})
    seeds = t.get("seeds", {})
    train = [v.get("train_s", 0.0) for v in seeds.values()]
    total = t.get("total_s")
    if results["config"].get("model") is not None:
        variants = [v for seed in seeds.values() for v in seed.values()]
        compress = [v["compress_s"] for v in variants if "compress_s" in v]
        return (f"Compression {sum(compress) / max(len(compress), 1):.1f} s per variant, evaluation "
                f"{sum(v.get('eval_s', 0.0) for v in variants) / max(len(variants), 1):.1f} s per model; whole run "
                f"{(total or 0) / 60:.1f} min.\n")  # fmt: skip
    return (f"Training {sum(train) / max(len(train), 1):.0f} s per seed; whole run "
            f"{(total or 0) / 60:.1f} min.\n")  # fmt: skip


def _figure_list(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("compression_bpb.png", f"held-out {ppl_unit(results)} by method and fraction removed"),
            ("compression_generation.png", "next-token KL to the original model on held-out prompts")]  # fmt: skip


SECTIONS = report_sections(setup=_setup, results=_results, ranking=_ranking, summary=_summary,
                           comparisons=lambda results, **_: claims_table(claims(results), smoke=is_smoke(results)),
                           protected=_protected, timing=_timing, claims=claims, figures=_figure_list,
                           against_original=_against_original)  # fmt: skip


# ---------------------------------------------------------------- figures


def _plot_metric(results: Mapping[str, Any], path: Path, metric: str, ylabel: str, scale: float, title: str) -> None:
    plt = pyplot()
    cfg = results["config"]
    panels = (False, True) if any(r["recovery"] for r in results["rows"]) else (False,)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + (1 if len(panels) == 1 else 0), 4.2),
                             sharey=True, squeeze=False)  # fmt: skip
    axes = list(axes[0])
    xs = [0.0, *cfg["removed"]]
    for ax, recovery in zip(axes, panels):
        control = [value(r, metric) * scale for r in _rows(results, NONE, 0.0, recovery).values()]
        for i, method in enumerate(_methods(results)):
            ys, lo, hi = [], [], []
            for x in xs:
                vals = control if x == 0.0 else [value(r, metric) * scale for r in _rows(results, method, x, recovery).values()]
                iv = mean_interval(vals)
                ys.append(iv.estimate)
                lo.append(iv.estimate - iv.low if iv.defined else 0.0)
                hi.append(iv.high - iv.estimate if iv.defined else 0.0)
            offset = (i - len(_methods(results)) / 2) * 0.004
            ax.errorbar([x * 100 + offset * 100 for x in xs], ys, yerr=[lo, hi], marker="o", capsize=2, label=method)
        ax.set_title("after recovery (step-matched)" if recovery else "one-shot")
        ax.set_xlabel("experts removed per layer (%)")
        ax.set_xticks([x * 100 for x in xs])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, ncol=2)
    fig.suptitle(plot_title(results, title + " (mean over seeds, 95% CI)"))
    save_figure(fig, path)


def write_figures(results: Mapping[str, Any], directory: str | Path) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    unit = ppl_unit(results)
    words = {"bits/byte": "bits per byte", "nats/token": "nats per token"}[unit]
    _plot_metric(results, out / "compression_bpb.png", ppl(results), f"held-out {words} (lower is better)", 1.0,
                 f"Held-out {unit}")  # fmt: skip
    _plot_metric(results, out / "compression_generation.png", "kl", "KL(original || model), nats/token (lower is closer)",
                 1.0, "Next-token KL to the original model")  # fmt: skip


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """``report.md`` and the figures in ``out``."""
    return write_markdown_report(
        results, out, SECTIONS, write_figures, title="Expert compression methods compared", figures=_figure_list(results),
        order=("setup", "command", "summary", "results",
               *(("against_original",) if any("vs_original" in r for r in results["rows"]) else ()),
               "ranking", "comparisons", "protected", "timing"),
        headings={"summary": "Summary", "ranking": "Ranking", "comparisons": "Claims",
                  "protected": "Protected super experts", "timing": "Timing",
                  "against_original": "Against the original, per seed"},
    )  # fmt: skip
