"""``moekit reproduce mcsmoe``: merge, then compress, a small MoE language model (MC-SMoE).

Trains a byte-level MoE LM (8 experts, top-2) on the Python standard library's own source, merges it
to 4 and 2 experts per layer (average, global budget) with M-SMoE, its baselines (prune to the
dominant experts, uniform averaging, random grouping) and ablations, with and without recovery
fine-tuning (KD from the full model, routers frozen), then compresses the M-SMoE models (low rank +
structured sparse residual, packed to its kept rows). One table: validation bits per byte,
parameters, FLOPs, checkpoint size, merge time.
Paper: Li et al., ICLR 2024, https://arxiv.org/abs/2310.01334.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import WEIGHTS_NAME, save_checkpoint
from ..data.stdlib_corpus import ByteCorpus, eval_windows, load_stdlib_corpus, random_windows
from ..merging.compress import StructuredPruner, compress_experts
from ..merging.packed import pack_compressed
from ..merging.cost import count_parameters, lm_flops_per_token
from ..merging.pipeline import merge_moekit_model
from ..merging.recovery import recover
from ..models.lm import MoELM
from ..models.lm_train import evaluate_bpb, train_lm
from ..reporting import atomic_directory, check_output_dir, environment, write_json
from ..progress import Progress, Task
from .mcsmoe_report import write_report

__all__ = ["MergeVariant", "VARIANTS", "McSmoeConfig", "run_mcsmoe"]


@dataclass(frozen=True)
class MergeVariant:
    """One merge configuration: ``merge_moekit_model`` keywords and whether it also gets recovery."""

    label: str
    method: str
    form: str = "exact"
    budget: str = "global"
    options: Mapping[str, Any] = field(default_factory=dict)
    recover: bool = True


VARIANTS: tuple[MergeVariant, ...] = (
    MergeVariant("M-SMoE", "mcsmoe"),
    MergeVariant("prune (dominant only)", "prune"),
    MergeVariant("uniform averaging", "uniform"),
    MergeVariant("random grouping", "random"),
    MergeVariant("M-SMoE, plain form", "mcsmoe", form="plain"),
    MergeVariant("M-SMoE w/o alignment", "mcsmoe", options={"align": False}, recover=False),
    MergeVariant("M-SMoE, uniform budget", "mcsmoe", budget="uniform", recover=False),
    MergeVariant("M-SMoE, expert-output grouping", "mcsmoe", options={"grouping": "expert_output"}, recover=False),
)


@dataclass(frozen=True)
class McSmoeConfig:
    """Sizes and schedule. ``quick()`` is a seconds-long smoke run for tests."""

    corpus_bytes: int = 4_000_000
    dim: int = 128
    depth: int = 4
    heads: int = 4
    hidden: int = 256
    experts: str = "glu"
    num_experts: int = 8
    k: int = 2
    seq_len: int = 128
    batch_size: int = 16
    train_steps: int = 1200
    lr: float = 3e-3
    aux_switch: float = 0.01
    calib_sequences: int = 32
    eval_windows: int = 128
    targets: tuple[int, ...] = (4, 2)
    recovery_steps: int = 80
    recovery_lr: float = 1e-3
    alpha: float = 0.2
    temperature: float = 2.0
    rank: int = 16
    compress_steps: int = 150
    final_ratio: float = 0.1
    seed: int = 0

    @classmethod
    def quick(cls) -> "McSmoeConfig":
        return cls(
            corpus_bytes=200_000, dim=32, depth=2, heads=2, hidden=64, seq_len=32, batch_size=8, train_steps=30,
            calib_sequences=8, eval_windows=16, recovery_steps=4, rank=4, compress_steps=6,
        )  # fmt: skip


def _batches(data: torch.Tensor, cfg: McSmoeConfig, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda step: random_windows(data, cfg.batch_size, cfg.seq_len, gen)


def _measure(model: torch.nn.Module, val: torch.Tensor, cfg: McSmoeConfig, *, checkpoint: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "val_bpb": evaluate_bpb(model, val),
        "params": count_parameters(model),
        "expert_params": sum(count_parameters(b.moe.experts) for b in model.blocks),
        "flops_per_token": lm_flops_per_token(model, cfg.seq_len),
        "experts_per_layer": [b.moe.experts.num_experts for b in model.blocks],
        "checkpoint_bytes": None,
    }
    if checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(model, Path(tmp) / "ckpt")
            row["checkpoint_bytes"] = (path / WEIGHTS_NAME).stat().st_size
    return row


def run_mcsmoe(
    cfg: McSmoeConfig, out_dir: str | Path | None = None, *, overwrite: bool = False, quiet: bool = False,
    smoke_run: bool = False, progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the whole comparison; writes ``report.md``, ``results.json`` and a PNG when ``out_dir`` is set
    (absent or empty, or with ``overwrite`` an earlier output of moekit). ``smoke_run`` labels a
    ``--quick`` run as such in the report and plot; ``progress`` reports each finished step (bars of
    the steps inside on a terminal unless ``quiet``)."""
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite, name="out_dir")
    progress = progress or Progress.off()
    steps = 2 + len(cfg.targets) * (len(VARIANTS) + sum(v.recover for v in VARIANTS) + 1)
    with progress.task(steps, "mcsmoe steps") as task:
        return _run(cfg, out_dir, overwrite=overwrite, quiet=quiet, smoke_run=smoke_run, task=task)


def _run(cfg: McSmoeConfig, out_dir: str | Path | None, *, overwrite: bool, quiet: bool, smoke_run: bool,
         task: Task) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(cfg.seed)
    corpus: ByteCorpus = load_stdlib_corpus(max_bytes=cfg.corpus_bytes)
    val = eval_windows(corpus.val, cfg.seq_len, cfg.eval_windows)
    calib = random_windows(corpus.train, cfg.calib_sequences, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 1))
    calib_batches = [c[:, :-1] for c in calib.split(cfg.batch_size)]
    model = MoELM(
        dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_seq_len=cfg.seq_len, num_experts=cfg.num_experts,
        k=cfg.k, hidden=cfg.hidden, experts=cfg.experts,
    )  # fmt: skip
    t0 = time.perf_counter()
    losses = train_lm(
        model, _batches(corpus.train, cfg, cfg.seed), steps=cfg.train_steps, lr=cfg.lr,
        aux_weights={"switch": cfg.aux_switch}, quiet=quiet, desc="train MoE LM",
    )  # fmt: skip
    train_time = time.perf_counter() - t0
    task.advance(note=f"trained the full model, {train_time:.0f} s")
    rows: list[dict[str, Any]] = [{"label": "full SMoE", "method": "-", "target": cfg.num_experts, "form": "-",
                                   "recovery": False, "merge_s": 0.0, **_measure(model, val, cfg, checkpoint=True)}]
    control = copy.deepcopy(model)  # same extra training as recovery, without merging
    train_lm(control, _batches(corpus.train, cfg, cfg.seed + 2), steps=cfg.recovery_steps, lr=cfg.recovery_lr,
             warmup=10, quiet=quiet, desc="full + continued training")  # fmt: skip
    task.advance(note="continued training of the full model")
    rows.append({"label": "full SMoE + continued training", "method": "-", "target": cfg.num_experts, "form": "-",
                 "recovery": True, "merge_s": 0.0, **_measure(control, val, cfg, checkpoint=False)})
    recovered: dict[int, torch.nn.Module] = {}
    for target in cfg.targets:
        for v in VARIANTS:
            t = time.perf_counter()
            merged = merge_moekit_model(
                model, calib_batches, experts=target, method=v.method, form=v.form, budget=v.budget,
                quiet=quiet, seed=cfg.seed, **v.options,
            )  # fmt: skip
            merge_s = time.perf_counter() - t
            base = {"label": v.label, "method": v.method, "target": target, "form": v.form, "merge_s": merge_s}
            rows.append({**base, "recovery": False, **_measure(merged, val, cfg, checkpoint=True)})
            task.advance(note=f"{v.label} to {target} experts")
            if not v.recover:
                continue
            recover(merged, model, _batches(corpus.train, cfg, cfg.seed + 2), steps=cfg.recovery_steps,
                    lr=cfg.recovery_lr, alpha=cfg.alpha, temperature=cfg.temperature, quiet=quiet,
                    desc=f"recover {v.label} ({target})")  # fmt: skip
            rows.append({**base, "recovery": True, **_measure(merged, val, cfg, checkpoint=False)})
            task.advance(note=f"recovered {v.label} ({target})")
            if v.label == "M-SMoE":
                recovered[target] = merged
        rows.append(_compress(recovered[target], model, corpus, val, cfg, target, quiet))
        task.advance(note=f"compressed M-SMoE ({target})")
    results = {
        "experiment": "mcsmoe", "paper": "https://arxiv.org/abs/2310.01334", "smoke_run": smoke_run, "config": asdict(cfg),
        "environment": environment(), "corpus": corpus.describe(), "train_time_s": train_time,
        "train_loss_first_last": [losses[0], losses[-1]] if losses else [], "rows": rows,
    }  # fmt: skip
    if out_dir is not None:
        with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_mcsmoe") as out:
            write_json(out / "results.json", results)
            write_report(results, out)
    return results


def _compress(merged: torch.nn.Module, teacher: torch.nn.Module, corpus: ByteCorpus, val: torch.Tensor,
              cfg: McSmoeConfig, target: int, quiet: bool) -> dict[str, Any]:  # fmt: skip
    t = time.perf_counter()
    student = compress_experts(merged, cfg.rank)
    steps = cfg.compress_steps
    pruner = StructuredPruner(student, steps=steps, final_ratio=cfg.final_ratio,
                              initial_warmup=max(1, steps // 10), final_warmup=max(1, steps // 5))  # fmt: skip
    recover(student, teacher, _batches(corpus.train, cfg, cfg.seed + 3), steps=steps, lr=cfg.recovery_lr,
            alpha=cfg.alpha, temperature=cfg.temperature, after_step=pruner.step, quiet=quiet,
            desc=f"compress M-SMoE ({target})")  # fmt: skip
    packed = pack_compressed(student, inplace=True)  # only the kept residual rows are stored
    return {"label": "MC-SMoE (M-SMoE + compression)", "method": "mcsmoe", "target": target, "form": "exact",
            "recovery": True, "merge_s": time.perf_counter() - t, **_measure(packed, val, cfg, checkpoint=True)}  # fmt: skip
