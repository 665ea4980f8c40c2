"""Report of ``moekit reproduce mcsmoe``: one markdown table and one PNG from ``results.json`` content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..reporting import atomic_write_text, markdown_table, save_figure

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    targets = results["config"]["targets"]
    full, control = rows[0]["val_bpb"], rows[1]["val_bpb"]
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(5.5 * (len(targets) + 1), 4.2))
    for ax, target in zip(axes, targets):
        labels = [r["label"] for r in rows if r["target"] == target and not r["recovery"]]
        for j, recovered in enumerate((False, True)):
            vals = [next((r["val_bpb"] for r in rows if r["target"] == target and r["label"] == lab
                          and r["recovery"] == recovered), float("nan")) for lab in labels]  # fmt: skip
            ax.barh([i + 0.4 * j for i in range(len(labels))], vals, height=0.4,
                    label="with recovery" if recovered else "merge only")  # fmt: skip
        ax.set_yticks([i + 0.2 for i in range(len(labels))], labels, fontsize=8)
        ax.axvline(full, color="k", ls="--", lw=1, label="full SMoE")
        ax.axvline(control, color="gray", ls=":", lw=1, label="full + continued training")
        ax.set_xlim(min(full, control) - 0.1, None)
        ax.invert_yaxis()
        ax.set_xlabel("validation bits per byte (lower is better)")
        ax.set_title(f"{target} experts per layer (average)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax = axes[-1]
    for r in rows:
        marker = "o" if r["recovery"] else "x"
        ax.scatter(r["expert_params"] / 1e6, r["val_bpb"], marker=marker, s=25)
        if r["label"] in ("full SMoE", "M-SMoE", "MC-SMoE (M-SMoE + compression)") and (r["recovery"] or r["target"] == rows[0]["target"]):
            ax.annotate(f"{r['label'].split(' (')[0]} {r['target']}", (r["expert_params"] / 1e6, r["val_bpb"]), fontsize=7)
    ax.set_xlabel("expert parameters (M)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("size vs quality (o: with recovery, x: merge only)")
    fig.tight_layout()
    return fig


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write ``report.md`` and ``mcsmoe.png`` into ``out``; returns the report path."""
    save_figure(_figure(results), out / "mcsmoe.png")
    cfg, corpus = results["config"], results["corpus"]
    text = f"""# MC-SMoE on a byte-level MoE language model

Paper: {results['paper']}. Model: {cfg['depth']} layers, dim {cfg['dim']}, {cfg['num_experts']} {cfg['experts']}
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
