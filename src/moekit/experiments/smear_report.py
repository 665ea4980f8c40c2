"""Report of ``moekit reproduce smear``: the method table (mean ± std over seeds), routing heatmaps per
domain, an accuracy chart; writes ``report.md`` and PNGs next to ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..layers.baselines import ROUTED_METHODS
from ..reporting import atomic_write_text, markdown_table, save_figure

__all__ = ["summarise", "write_report"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def summarise(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: mean and (population) std over seeds of accuracy, per-domain accuracy, times; the
    parameter counts; the mean over sites of the domain-expert mutual information (bits)."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["method"] == method]
        domains = len(runs[0]["per_domain"])
        mi = [sum(r["domain_expert_mi_bits"].values()) / len(r["domain_expert_mi_bits"])
              for r in runs if r["domain_expert_mi_bits"]]  # fmt: skip
        out[method] = {
            "seeds": len(runs),
            "accuracy": _mean_std([r["accuracy"] for r in runs]),
            "per_domain": [_mean_std([r["per_domain"][d] for r in runs]) for d in range(domains)],
            "train_s": _mean_std([r["train_s"] for r in runs]),
            "infer_ms_per_1k": _mean_std([r["infer_ms_per_1k"] for r in runs]),
            "adapter_params": runs[0]["adapter_params"],
            "trainable_params": runs[0]["trainable_params"],
            "mi_bits": _mean_std(mi) if mi else (math.nan, math.nan),
        }
    return out


def _pct(ms: tuple[float, float]) -> str:
    return "nan" if ms[0] != ms[0] else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _table(results: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    domains = results["data"]["domains"]
    headers = ["method", "accuracy %", *[f"{d} %" for d in domains], "adapter+router params", "trainable params",
               "train s", "inference ms / 1k images", "domain-expert MI (bits)"]  # fmt: skip
    rows = []
    for method, s in summary.items():
        mi = "—" if s["mi_bits"][0] != s["mi_bits"][0] else f"{s['mi_bits'][0]:.2f}"
        times = [f"{s['train_s'][0]:.1f}", f"{s['infer_ms_per_1k'][0]:.0f}"]
        rows.append([f"`{method}`", _pct(s["accuracy"]), *[_pct(d) for d in s["per_domain"]], s["adapter_params"],
                     s["trainable_params"], *times, mi])  # fmt: skip
    zs = results["zero_shot"]
    per_domain = [f"{100 * a:.1f}" for a in zs["per_domain"]]
    rows.append(["backbone only (zero-shot)", f"{100 * zs['accuracy']:.1f}", *per_domain, 0, 0, "—", "—", "—"])
    return markdown_table(headers, rows)


def _comparison(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line per baseline: SMEAR's accuracy difference and whether it exceeds the seeds' spread."""
    if "smear" not in summary:
        return []
    s_mean, s_std = summary["smear"]["accuracy"]
    lines = []
    for method, s in summary.items():
        if method == "smear":
            continue
        m, sd = s["accuracy"]
        diff = 100 * (s_mean - m)
        spread = 100 * (s_std + sd)
        if min(summary["smear"]["seeds"], s["seeds"]) < 2:
            lines.append(f"- vs `{method}`: {diff:+.1f} points (one seed: no spread to compare with)")
            continue
        verdict = "within the seeds' spread" if abs(diff) <= spread else ("SMEAR better" if diff > 0 else "SMEAR worse")
        lines.append(f"- vs `{method}`: {diff:+.1f} points ({verdict}; sum of stds {spread:.1f})")
    return lines


def _heatmaps(results: dict[str, Any], method: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    run = next((r for r in results["runs"] if r["method"] == method and r["routing"]), None)
    if run is None:
        return False
    sites = list(run["routing"])
    cols = min(4, len(sites))
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    domains = results["data"]["domains"]
    for ax, site in zip(axes.flat, sites):
        im = ax.imshow(run["routing"][site], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{site}  MI {run['domain_expert_mi_bits'][site]:.2f} b", fontsize=8)
        ax.set_yticks(range(len(domains)), domains, fontsize=7)
        ax.set_xticks(range(len(run["routing"][site][0])))
        ax.set_xlabel("expert", fontsize=7)
    for ax in list(axes.flat)[len(sites) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean routing weight")
    fig.suptitle(f"{method}: routing distribution per domain (test images, seed {run['seed']})")
    save_figure(fig, path)
    return True


def _methods_heatmap(results: dict[str, Any], path: Path) -> bool:
    """The last site's routing per domain for every routed method."""
    import matplotlib.pyplot as plt

    runs = {}
    for r in results["runs"]:
        if r["routing"] and r["method"] not in runs:
            runs[r["method"]] = r
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 3.2), squeeze=False, layout="constrained")
    domains = results["data"]["domains"]
    for ax, (method, r) in zip(axes[0], runs.items()):
        site = list(r["routing"])[-1]
        ax.imshow(r["routing"][site], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{method}\nMI {r['domain_expert_mi_bits'][site]:.2f} b", fontsize=8)
        ax.set_yticks(range(len(domains)), domains if ax is axes[0][0] else [""] * len(domains), fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    first = next(iter(runs.values()))
    fig.suptitle(f"routing per domain at the last site ({list(first['routing'])[-1]}), seed {first['seed']}")
    save_figure(fig, path)
    return True


def _accuracy_chart(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(summary), 3.2), layout="constrained")
    names = list(summary)
    ax.bar(range(len(names)), [100 * summary[n]["accuracy"][0] for n in names],
           yerr=[100 * summary[n]["accuracy"][1] for n in names], color="tab:blue", capsize=3)  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    low = min(100 * summary[n]["accuracy"][0] for n in names)
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_ylabel("test accuracy % (mean ± std)")
    save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path) -> Path:
    summary = summarise(results)
    cfg, data = results["config"], results["data"]
    pngs = []
    if _heatmaps(results, "smear", out / "routing_smear.png"):
        pngs.append(("SMEAR's routing per domain at every site", "routing_smear.png"))
    if _methods_heatmap(results, out / "routing_methods.png"):
        pngs.append(("Routing per domain at the last site, every routed method", "routing_methods.png"))
    _accuracy_chart(summary, out / "accuracy.png")
    pngs.append(("Accuracy per method", "accuracy.png"))
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    lines = [
        "# SMEAR: merged-expert adapters vs routing baselines (multi-domain digits)",
        "",
        f"Paper: {results['paper']}. A ResNet-18 (width {cfg['width']}) pretrained on the *clean* domain only "
        f"({cfg['pretrain_epochs']} epochs, {results['pretrain_s']:.0f}s), frozen; routed adapters after each of its "
        f"{len(results['runs'][0]['sites'])} BasicBlocks ({cfg['num_experts'] or len(data['domains'])} experts, bottleneck "
        f"{cfg['bottleneck']}, routed per image) and a new head trained for {cfg['epochs']} epochs on "
        f"{data['train']} training images of {len(data['domains'])} domains; {data['test']} test images "
        f"({'x'.join(str(v) for v in data['image'])}). Seeds: {seeds}. Mean ± std over seeds.",
        "",
        _table(results, summary),
        "Methods: " + "; ".join(f"`{m}`: {ROUTED_METHODS[m]}" for m in summary) + ".",
        "",
        f"Domain-expert MI: mutual information between an image's domain and its top expert, mean over sites "
        f"(bits; at most log2({len(data['domains'])}) = {math.log2(len(data['domains'])):.2f}). "
        "Tag routing has the maximum by construction.",
        "",
        "## SMEAR against each method (accuracy)",
        "",
        *_comparison(summary),
        "",
        *[f"## {title}\n\n![{title}]({name})\n" for title, name in pngs],
        f"Environment: torch {results['environment']['torch']}, {results['environment']['platform']}, "
        f"{results['environment']['torch_threads']} thread(s). Times are wall-clock on that machine.",
        "",
    ]
    return atomic_write_text(out / "report.md", "\n".join(lines))
