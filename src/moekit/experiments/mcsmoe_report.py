"""Report of ``moekit reproduce mcsmoe``: one markdown table and one PNG from ``results.json`` content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..reporting import atomic_write_text, markdown_table, save_figure
from .report_common import plot_title, smoke_banner

__all__ = ["results_table", "write_report"]

HEADERS = (
    "variant", "experts/layer", "form", "recovery", "val bpb", "Δ bpb", "params", "expert params",
    "MFLOPs/token", "checkpoint MB", "merge s",
)  # fmt: skip


def results_table(results: dict[str, Any]) -> str:
    """The markdown table of every row (Δ bpb is against the full model without extra training)."""
    rows = results["rows"]
    full = rows[0]["val_bpb"]
    body = []
    for r in rows:
        layers = ",".join(str(n) for n in r["experts_per_layer"])
        size = "—" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / 2**20:.2f}"
        body.append((
            r["label"], f"{r['target']} ({layers})", r["form"], "yes" if r["recovery"] else "no",
            f"{r['val_bpb']:.4f}", f"{r['val_bpb'] - full:+.4f}", f"{r['params'] / 1e6:.3f}M",
            f"{r['expert_params'] / 1e6:.3f}M", f"{r['flops_per_token'] / 1e6:.3f}", size, f"{r['merge_s']:.2f}",
        ))  # fmt: skip
    return markdown_table(HEADERS, body)


def _figure(results: dict[str, Any]) -> Any:
    """Top row: bits per byte of every variant at each target (bars: merge only / with recovery; lines:
    the full model, before and after the same extra training). Bottom: size against quality, one colour
    per variant (legend), marker = with or without recovery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = results["rows"]
    targets = results["config"]["targets"]
    full, control = rows[0]["val_bpb"], rows[1]["val_bpb"]
    fig = plt.figure(figsize=(6.8 * len(targets), 9.5), layout="constrained")
    grid = fig.add_gridspec(2, len(targets), height_ratios=(1.0, 1.1))
    for col, target in enumerate(targets):
        ax = fig.add_subplot(grid[0, col])
        labels = [r["label"] for r in rows if r["target"] == target and not r["recovery"]]
        for j, recovered in enumerate((False, True)):
            vals = [next((r["val_bpb"] for r in rows if r["target"] == target and r["label"] == lab
                          and r["recovery"] == recovered), float("nan")) for lab in labels]  # fmt: skip
            ax.barh([i + 0.4 * j for i in range(len(labels))], vals, height=0.4,
                    label="with recovery" if recovered else "merge only")  # fmt: skip
        ax.set_yticks([i + 0.2 for i in range(len(labels))], labels, fontsize=8)
        ax.axvline(full, color="k", ls="--", lw=1, label="full SMoE (8 experts)")
        ax.axvline(control, color="gray", ls=":", lw=1, label="full SMoE + continued training")
        ax.set_xlim(min(full, control) - 0.1, None)
        ax.invert_yaxis()
        ax.set_xlabel("validation bits per byte (lower is better)")
        ax.set_title(f"merged to {target} experts per layer (average)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax = fig.add_subplot(grid[1, :])
    names = list(dict.fromkeys(r["label"] for r in rows))
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    for r in rows:
        ax.scatter(r["expert_params"] / 1e6, r["val_bpb"], marker="o" if r["recovery"] else "x", s=36,
                   color=colours[r["label"]])  # fmt: skip
        if r["label"] in ("full SMoE", "M-SMoE", "MC-SMoE (M-SMoE + compression)"):
            ax.annotate(f"{r['target']}", (r["expert_params"] / 1e6, r["val_bpb"]), xytext=(5, 3),
                        textcoords="offset points", fontsize=7)  # fmt: skip
    ax.margins(x=0.08, y=0.12)
    handles = [Line2D([], [], ls="", marker="s", color=colours[n], label=n) for n in names]
    handles += [Line2D([], [], ls="", marker="o", color="k", label="with recovery"),
                Line2D([], [], ls="", marker="x", color="k", label="merge only")]  # fmt: skip
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="variant",
              title_fontsize=8)  # fmt: skip
    ax.set_xlabel("expert parameters (M)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title("size against quality (numbers: experts per layer of the full, M-SMoE and MC-SMoE models)")
    fig.suptitle(plot_title(results, "MC-SMoE: merging, recovery and compression of a byte-level MoE LM"))
    return fig


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write ``report.md`` and ``mcsmoe.png`` into ``out``; returns the report path."""
    save_figure(_figure(results), out / "mcsmoe.png")
    cfg, corpus = results["config"], results["corpus"]
    text = f"""# MC-SMoE on a byte-level MoE language model

{smoke_banner(results)}Paper: {results['paper']}. Model: {cfg['depth']} layers, dim {cfg['dim']}, {cfg['num_experts']} {cfg['experts']}
experts (hidden {cfg['hidden']}), top-{cfg['k']}, trained {cfg['train_steps']} steps
(batch {cfg['batch_size']} x {cfg['seq_len']} bytes, {results['train_time_s']:.0f} s) on the Python {corpus['python']}
standard library source ({corpus['train_bytes']} train / {corpus['val_bytes']} validation bytes, split by file).
Merging uses {cfg['calib_sequences']} calibration sequences and an average budget (global unless noted);
recovery = {cfg['recovery_steps']} steps of LM loss + {cfg['alpha']} x KL (T={cfg['temperature']}) to the full
model, routers frozen. MC-SMoE = the recovered M-SMoE model with rank-{cfg['rank']} factors plus a row-pruned
residual kept at {cfg['final_ratio']:.0%}, fine-tuned {cfg['compress_steps']} steps with KD, then packed
(`pack_compressed`: only the kept residual rows are stored).
"experts/layer" shows the target average and each layer's count; Δ bpb is against the full model;
FLOPs count k={cfg['k']} expert runs per token; checkpoint MB = `model.safetensors` of `save_checkpoint`
(MC-SMoE rows: the packed model; recovered rows have the size of their merge-only row).

{results_table(results)}
![MC-SMoE results](mcsmoe.png)
"""
    return atomic_write_text(out / "report.md", text)
