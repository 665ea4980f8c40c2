"""Analysis and report of ``moekit reproduce comet``: best-5% summaries, tuning-budget curves,
per-expert utilisation; writes ``report.md`` and PNGs next to ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..reporting import atomic_write_text, markdown_table, save_figure

__all__ = [
    "is_sparse_trial",
    "top_trials",
    "mean_se",
    "expected_best_curve",
    "trials_to_match",
    "summarise",
    "write_report",
]


def is_sparse_trial(trial: dict[str, Any], threshold: float) -> bool:
    """Whether every task gate routed at least ``threshold`` of the test examples to <= k experts."""
    return trial["test"] is not None and min(trial["test"]["fraction_hard"]) >= threshold


def top_trials(
    trials: Sequence[dict[str, Any]], fraction: float, *, sparse: float | None = None
) -> list[dict[str, Any]]:
    """The best ``max(2, ceil(fraction * N))`` of the N trials by validation loss; with ``sparse``,
    only trials that are ``is_sparse_trial`` at that threshold compete (fewer if fewer qualify)."""
    ok = [t for t in trials if t["test"] is not None and (sparse is None or is_sparse_trial(t, sparse))]
    ranked = sorted(ok, key=lambda t: t["val_loss"])
    return ranked[: max(2, math.ceil(fraction * len(trials)))]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def expected_best_curve(values: Sequence[float]) -> list[float]:
    """``E[min of m trials drawn without replacement]`` for m = 1..N, exactly: with values sorted
    ascending, the i-th smallest (1-based) is the minimum with probability ``C(N-i, m-1) / C(N, m)``."""
    v = sorted(values)
    N = len(v)
    curve = []
    for m in range(1, N + 1):
        total = math.comb(N, m)
        acc = 0.0
        for i, value in enumerate(v, start=1):
            ways = math.comb(N - i, m - 1)
            if ways:
                acc += value * ways / total
        curve.append(acc)
    return curve


def trials_to_match(curve: Sequence[float], target: float) -> int | None:
    """Fewest trials whose expected best reaches ``target`` (None if never)."""
    return next((m for m, value in enumerate(curve, start=1) if value <= target), None)


def _metrics(top: list[dict[str, Any]], num_tasks: int) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    per_task = [mean_se([t["test"]["metric"][i] for t in top]) for i in range(num_tasks)]
    return per_task, mean_se([sum(t["test"]["metric"]) / num_tasks for t in top])


def summarise(dataset: dict[str, Any], fraction: float, sparse_threshold: float) -> dict[str, dict[str, Any]]:
    """Per gate: best-fraction mean +- SE of each task's test metric and of their mean (over all
    trials, and over the trials whose gates were k-sparse), the expected-best curve, and the routing
    of the best trial."""
    out = {}
    num_tasks = len(dataset["tasks"])
    for gate, trials in dataset["trials"].items():
        top = top_trials(trials, fraction)
        top_sparse = top_trials(trials, fraction, sparse=sparse_threshold)
        per_task, average = _metrics(top, num_tasks)
        sparse_per_task, sparse_average = _metrics(top_sparse, num_tasks)
        out[gate] = {
            "top_n": len(top),
            "per_task": per_task,
            "average": average,
            "sparse_trials": sum(is_sparse_trial(t, sparse_threshold) for t in trials),
            "sparse_top_n": len(top_sparse),
            "sparse_per_task": sparse_per_task,
            "sparse_average": sparse_average,
            "curve": expected_best_curve([t["val_loss"] for t in trials]),
            "best": top[0]["test"] if top else None,
            "best_hparams": top[0]["hparams"] if top else None,
            "train_s": sum(t["train_s"] for t in trials),
        }
    return out


def _fmt(ms: tuple[float, float], scale: float) -> str:
    return f"{ms[0] * scale:.2f} ± {ms[1] * scale:.2f}"


def _summary_table(name: str, dataset: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    percent = dataset["metric"] == "accuracy"
    scale, unit = (100.0, "accuracy %") if percent else (1.0, "MSE")
    tasks = [t["name"] for t in dataset["tasks"]]
    headers = [
        "gate",
        *[f"{t} test {unit}" for t in tasks],
        f"mean {unit}",
        "best val loss",
        "experts run / example",
        "hard-routed examples",
        "search s",
    ]
    rows = []
    for gate, s in summary.items():
        best = s["best"]
        rows.append(
            [
                gate,
                *[_fmt(ms, scale) for ms in s["per_task"]],
                _fmt(s["average"], scale),
                s["curve"][-1] if s["curve"] else math.nan,
                " / ".join(f"{v:.2f}" for v in best["experts_per_example"]) if best else "-",
                " / ".join(f"{100 * v:.0f}%" for v in best["fraction_hard"]) if best else "-",
                f"{s['train_s']:.0f}",
            ]
        )
    return f"### {name}\n\n" + markdown_table(headers, rows, floatfmt=".4f")


def _budget_table(summary: dict[str, dict[str, Any]], trials: int) -> str:
    rows = []
    for gate in summary:
        if gate.endswith("+") or f"{gate}+" not in summary:
            continue
        plain, plus = summary[gate]["curve"], summary[f"{gate}+"]["curve"]
        m_plus = trials_to_match(plus, plain[-1])
        m_plain = trials_to_match(plain, plus[-1])
        rows.append(
            [
                gate,
                plain[-1],
                plus[-1],
                "never" if m_plus is None else f"{m_plus} ({trials / m_plus:.1f}x fewer)",
                "never" if m_plain is None else f"{m_plain} ({trials / m_plain:.1f}x fewer)",
            ]
        )
    headers = [
        "gate",
        f"E[best val] plain, {trials} trials",
        f"E[best val] +, {trials} trials",
        "trials + needs to match plain",
        "trials plain needs to match +",
    ]
    return markdown_table(headers, rows, floatfmt=".4f")


def _shares(values: Sequence[float]) -> list[float]:
    total = sum(values) or 1.0
    return [v / total for v in values]


def _utilisation_table(summary: dict[str, dict[str, Any]], num_experts: int) -> str:
    rows = []
    for gate, s in summary.items():
        if s["best"] is None:
            continue
        for t, (slots, weight) in enumerate(zip(s["best"]["slots_per_expert"], s["best"]["weight_per_expert"])):
            shares = _shares(weight)
            ran = sum(c > 0 for c in slots)
            rows.append([gate, t + 1, f"{ran}/{num_experts}", max(shares), " ".join(f"{v:.2f}" for v in shares)])
    headers = ["gate", "task", "experts that ran", "max weight share", "share of test gate weight per expert"]
    return markdown_table(headers, rows, floatfmt=".2f")


def _sparse_table(dataset: dict[str, Any], summary: dict[str, dict[str, Any]], threshold: float) -> str:
    scale, unit = (100.0, "accuracy %") if dataset["metric"] == "accuracy" else (1.0, "MSE")
    headers = ["gate", "k-sparse trials", *[f"{t['name']} test {unit}" for t in dataset["tasks"]], f"mean {unit}"]
    rows = []
    for gate, s in summary.items():
        n = s["sparse_trials"]
        cells = [_fmt(ms, scale) for ms in s["sparse_per_task"]] if n else ["-"] * len(dataset["tasks"])
        rows.append(
            [gate, f"{n}/{len(dataset['trials'][gate])}", *cells, _fmt(s["sparse_average"], scale) if n else "-"]
        )
    return (
        f"Only trials whose gates route at least {threshold:.0%} of the test examples to at most k experts "
        "(a trained k-sparse gate), best 5% (at least 2) by validation loss:\n\n" + markdown_table(headers, rows)
    )


def _plot_curves(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    colours = {}
    for ax, name in zip(axes[0], names):
        for gate, s in summaries[name].items():
            base = gate.rstrip("+")
            colour = colours.setdefault(base, f"C{len(colours)}")
            ax.plot(
                range(1, len(s["curve"]) + 1),
                s["curve"],
                color=colour,
                linestyle="--" if gate.endswith("+") else "-",
                label=gate,
            )
        ax.set_xscale("log")
        ax.set_xlabel("random-search trials per gate")
        ax.set_ylabel("expected best validation loss")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, ncol=2)
    fig.suptitle("tuning budget: expected best validation loss after m trials (dashed: + local search)")
    save_figure(fig, path)


def _plot_utilisation(name: str, summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, rows = [], []
    for gate, s in summary.items():
        for t, weight in enumerate(s["best"]["weight_per_expert"] if s["best"] else []):
            labels.append(f"{gate} / task {t + 1}")
            rows.append(_shares(weight))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(rows[0]), 0.6 + 0.32 * len(rows)))
    image = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(len(rows[0])))
    ax.set_xlabel("expert")
    ax.set_title(f"{name}: share of test gate weight per expert (best trial)")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path) -> None:
    """``report.md``, ``budget.png`` and ``utilisation_<dataset>.png`` in ``out``."""
    cfg = results["config"]
    threshold = cfg["sparse_threshold"]
    summaries = {name: summarise(d, cfg["top_fraction"], threshold) for name, d in results["datasets"].items()}
    _plot_curves(summaries, out / "budget.png")
    sections = []
    for name, d in results["datasets"].items():
        _plot_utilisation(name, summaries[name], out / f"utilisation_{name}.png")
        s = summaries[name]
        top_n = next(iter(s.values()))["top_n"]
        sections.append(
            _summary_table(name, d, s)
            + f"\n{d['num_experts']} experts, k = {d['k']}; {d['features']} input features; train/val/test = "
            f"{'/'.join(map(str, d['sizes']))}. Test metric: mean of the best {top_n} of {cfg['trials']} trials by "
            "validation loss ± standard error. Experts run and hard-routed share are per task gate for the best "
            f"trial.\n\n{_sparse_table(d, s, threshold)}\n"
            "Tuning budget (expected best validation loss, exact over trial orderings):\n\n"
            f"{_budget_table(s, cfg['trials'])}\n"
            f"Expert utilisation of each gate's best trial:\n\n{_utilisation_table(s, d['num_experts'])}\n"
            f"![utilisation {name}](utilisation_{name}.png)\n"
        )
    text = (
        "# COMET reproduction: sparse gates and permutation local search on multi-task data\n\n"
        "Multi-gate MoE (one gate and tower per task, shared MLP experts). Each gate is tuned by random search "
        f"with {cfg['trials']} trials per data set ({cfg['epochs']} epochs each, Adam, early stopping on the "
        "validation loss at epoch ends). Learning rate log-uniform in "
        f"{cfg['lr_range']}; DSelect-k/COMET also log-uniform gamma in {cfg['gamma_range']} and entropy coefficient in "
        f"{cfg['entropy_range']}; '+' gates learn the permutation for a fraction {cfg['local_search_range']} of "
        "training, then round it (Hungarian) and freeze it. Top-k has no noise and no balancing loss; hash routes "
        f"by a {cfg['hash_bits']}-bit random-projection hash of the input. Softmax is dense, so it has no '+' "
        "variant (local search needs a sparse gate).\n\n" + "\n".join(sections) + "\n![tuning budget](budget.png)\n"
    )
    atomic_write_text(out / "report.md", text)
