"""``moekit reproduce compression --model DIR``: every compression method on a model the user points to.

Nothing is trained. For each seed, method and removed fraction the model (a Hugging Face model
directory of a supported family, or a moekit checkpoint; only read) goes through
``moekit.merging.streaming.compress_checkpoint`` -- the streamed pipeline of ``moekit compress`` -- with
the comparison's spec of that method (``compression.spec_for``: REAP's rounding of the removed count,
M-SMoE's global budget), is reloaded from its directory with ``moekit.evaluation.load_model`` and is
evaluated (``compression.variant_tasks``: bits per byte on text data, nats per token on token-id data;
choice accuracy on text; generation agreement and KL to the original), and paired against the original
on the same documents and items (``against_original``).

Calibration: the ``calib`` sources read as ``moekit compress --calib`` reads them (``stdlib``: the
standard library's training files), ``4 * calib_sequences`` windows of ``seq_len`` tokens of which each
seed draws ``calib_sequences`` at random (token-id files: their rows). Evaluation: the ``data`` sources
read as ``moekit eval --data`` reads them (``stdlib``: the held-out files); a file may not be in both.
Recovery (``recovery_steps > 0``, moekit checkpoints only): every variant, the uncompressed control
included, reloaded and then trained by the same KD steps from the original as in the trained-LM comparison
(``compression.recovered``), on random byte windows of the calibration text. Hugging Face models get no
recovery (``moekit.merging.recovery`` trains moekit modules), so ``recovery_steps`` must be 0 for them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from ..data.calibration import is_token_file, read_calibration_bytes
from ..progress import Progress
from .compression import NONE, STDLIB, CompressionConfig, describe_data, perplexity_metric, variant_metrics
from .compression import eval_settings, recovered, recovery_batches, result_row, spec_for, variant_tasks

__all__ = ["POOL", "check_model_config", "model_info", "rebatch", "calibration", "against_original", "run_model"]

#: calibration windows cut from text per window a seed draws
POOL = 4


def check_model_config(cfg: CompressionConfig) -> None:
    """The checks of a ``model`` run that need no model: calibration and evaluation data given and disjoint."""
    if not cfg.calib or not cfg.data:
        raise ValueError("calib and data (--calib, --data) must each name at least one source")
    files = lambda sources: {str(Path(s).resolve()) for s in sources if s != STDLIB}  # noqa: E731
    shared = sorted(files(cfg.calib) & files(cfg.data))
    if shared:
        raise ValueError(f"calib and data (--calib, --data) share {shared}; calibration and evaluation need disjoint data")


def model_info(cfg: CompressionConfig) -> SimpleNamespace:
    """What ``moekit compress`` knows of the model before a run (expert counts, vocabulary, context,
    tokenizer), checked against the removed fractions."""
    from ..merging.inputs import checkpoint_info

    info = checkpoint_info(Path(str(cfg.model)))
    if info.decoder:
        raise ValueError(f"model (--model) {cfg.model!r} is encoder-decoder; the comparison evaluates causal LMs")
    if cfg.recovery_steps and info.kind != "moekit":
        raise ValueError(f"recovery_steps (--recovery-steps) must be 0 for the Hugging Face model {cfg.model!r}, got "
                         f"{cfg.recovery_steps}: KD recovery trains moekit models (give a moekit checkpoint)")  # fmt: skip
    if cfg.recovery_steps and any(is_token_file(s) for s in cfg.calib):
        raise ValueError("recovery_steps (--recovery-steps) > 0 trains on the calibration text; give text --calib "
                         f"sources, not token-id files ({list(cfg.calib)})")  # fmt: skip
    fewest = min(info.counts.values())
    bad = [r for r in cfg.removed if not 0 < r < 1 or int(fewest * r) < 1]
    if bad:
        raise ValueError(f"removed fractions (--removed) must remove at least one of {fewest} experts (the fewest in "
                         f"a MoE block of {cfg.model!r}) and keep one, got {bad}")  # fmt: skip
    return info


def _shape(row: Any) -> Any:
    return tuple(sorted((k, tuple(v.shape)) for k, v in row.items())) if isinstance(row, dict) else tuple(row.shape)


def _cat(rows: Sequence[Any]) -> Any:
    if isinstance(rows[0], dict):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return torch.cat(list(rows))


def rebatch(rows: Sequence[Any], batch_size: int) -> list[Any]:
    """One-row batches (tensors ``[1, S]`` or dicts of them) joined into batches of up to ``batch_size``
    rows, in order; a batch never mixes shapes (rows of different token-id files)."""
    batches, group = [], []
    for row in rows:
        if group and (len(group) == batch_size or _shape(row) != _shape(group[0])):
            batches.append(_cat(group))
            group = []
        group.append(row)
    return batches + ([_cat(group)] if group else [])


def calibration(cfg: CompressionConfig, info: SimpleNamespace, seed: int) -> tuple[list[Any], dict[str, Any]]:
    """Seed ``seed``'s calibration batches (``moekit compress``'s reading of ``cfg.calib``, then a seeded
    draw of ``cfg.calib_sequences`` rows) and what they are."""
    from ..merging.inputs import calibration_batches

    pool, described = calibration_batches(cfg.calib, samples=POOL * cfg.calib_sequences, seq_len=cfg.seq_len, batch_size=1,
                                          vocab_size=info.vocab, context=info.context, tokenizer=info.tokenizer,
                                          decoder=info.decoder, byte_level=info.kind == "moekit")  # fmt: skip
    draw = torch.randperm(len(pool), generator=torch.Generator().manual_seed(10_000 + seed))[: cfg.calib_sequences]
    rows = [pool[i] for i in sorted(draw.tolist())]
    ids = [r["input_ids"] if isinstance(r, dict) else r for r in rows]
    return rebatch(rows, cfg.batch_size), {**described, "pool_rows": len(pool), "rows": len(rows),
                                           "tokens": sum(int(t.numel()) for t in ids), "draw_seed": 10_000 + seed}  # fmt: skip


def against_original(tasks: dict[str, Any], original: dict[str, Any], data: Any, settings: Any) -> dict[str, Any]:
    """Perplexity and choice accuracy of a variant minus the original's on the same documents and items
    (``moekit.evaluation.compare_runs``: paired BCa bootstrap over them): ``{metric: {difference, verdict}}``."""
    from ..evaluation import compare_runs

    keep = (perplexity_metric(data), "acc")
    scored = [t for t in ("perplexity", "choice") if t in tasks]
    rows = compare_runs({"name": "variant", "tasks": {t: tasks[t] for t in scored}},
                        {"name": "original", "tasks": {t: original[t] for t in scored}}, **settings.stats())  # fmt: skip
    return {r["metric"]: {"difference": r["difference"], "verdict": r["verdict"]} for r in rows if r["metric"] in keep}


def run_model(cfg: CompressionConfig, progress: Progress,
              models_dir: Path | None) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Every seed, method and fraction on ``cfg.model``: ``(rows, timing, data description)``. The
    compressed models are written to ``models_dir`` (kept), or to a temporary directory removed after
    each variant is evaluated."""
    from ..evaluation import load_data, load_model, wrap_model
    from ..merging.streaming import compress_checkpoint

    info = model_info(cfg)
    data = load_data(list(cfg.data), max_bytes=cfg.corpus_bytes).head(cfg.eval_documents)
    reference = load_model(str(cfg.model))
    text = torch.frombuffer(bytearray(read_calibration_bytes(list(cfg.calib))), dtype=torch.uint8) if cfg.recovery_steps else None
    ppl = perplexity_metric(data)
    rows: list[dict[str, Any]] = []
    timing: dict[str, Any] = {"seeds": {}}
    calibrations: dict[str, Any] = {}
    per_seed = 1 + len(cfg.methods) * len(cfg.removed)
    with tempfile.TemporaryDirectory(prefix="moekit-compression-") as scratch, \
            progress.task(len(cfg.seeds) * per_seed, "compression variants") as task:  # fmt: skip
        for seed in cfg.seeds:
            settings = eval_settings(cfg, seed)
            calib, calibrations[str(seed)] = calibration(cfg, info, seed)
            recovery = recovery_batches(text, cfg, seed) if text is not None else []
            seed_timing: dict[str, Any] = {}

            original = variant_tasks(reference, reference, data, settings)

            def finish(label: str, method: str, removed: float, model: Any, counts: list[int], details: dict[str, Any]) -> None:
                """Evaluate ``model`` one-shot and, with recovery, after the seed's recovery steps; each paired
                against the original (but the original itself)."""
                t = time.perf_counter()
                variants = [(0, model)]
                if recovery:
                    student = recovered(model.module, reference.module, recovery, cfg, label)
                    variants.append((cfg.recovery_steps, wrap_model(student, name="recovered")))
                for steps, variant in variants:
                    tasks = original if variant is reference else variant_tasks(variant, reference, data, settings)
                    paired = {} if variant is reference else {"vs_original": against_original(tasks, original, data, settings)}
                    rows.append(result_row(seed, method, removed, steps, counts, model.info["parameters"],
                                           variant_metrics(tasks, data), {**details, **paired}))  # fmt: skip
                seed_timing.setdefault(label, {})["eval_s"] = time.perf_counter() - t
                task.advance(note=f"seed {seed} {label}: {rows[-len(variants)]['metrics'][ppl]['estimate']:.3f} {ppl}")

            finish(NONE, NONE, 0.0, reference, list(info.counts.values()), {"form": "-", "budget": "-", "kept": {},
                                                                            "protected": None})  # fmt: skip
            for removed in cfg.removed:
                for method in cfg.methods:
                    label, name = f"{method}@{removed:g}", f"seed{seed}-{method}-{removed:g}"
                    where = (models_dir or Path(scratch)) / name
                    t = time.perf_counter()
                    report = compress_checkpoint(cfg.model, where, calib, spec_for(method, 1.0 - removed, seed), quiet=True,
                                                 settings={"calibration_sources": calibrations[str(seed)]})  # fmt: skip
                    seed_timing[label] = {"compress_s": time.perf_counter() - t}
                    kept = {"model_dir": f"models/{name}"} if models_dir is not None else {}
                    finish(label, method, removed, load_model(where), list(report["experts_per_block"].values()),
                           {"form": report["form"], "budget": report["budget"], "kept": report["kept"],
                            "protected": report["protected_super_experts"], **kept})  # fmt: skip
                    if models_dir is None:
                        shutil.rmtree(where)
            timing["seeds"][str(seed)] = seed_timing
    described = {"model": {"path": str(cfg.model), "kind": info.kind, "experts_per_block": info.counts,
                           **{k: reference.info.get(k) for k in ("model_type", "parameters", "tokenizer")}},
                 "calibration": calibrations, "evaluation": describe_data(data), "perplexity_metric": ppl}  # fmt: skip
    return rows, timing, described
