"""``moekit reproduce compression``: every expert-compression method on one small MoE LM, step-matched.

Per seed: a byte-level MoE LM (``moekit.models.lm.MoELM``, 8 experts, top-2) is trained on the
Python standard library's training files; calibration windows come from those training files, the
evaluation from the held-out files (``moekit.evaluation.stdlib_heldout``: same split rule). Every
method removes 25% and 50% of each layer's experts (``CompressionSpec``; statistics of the original
model, ``propagate="original"``, as REAP and M-SMoE do), once without recovery and once after the
same number of recovery steps (KD from the original model, routers frozen, the same batches) -- as
does the no-compression control, so every recovered variant had exactly the same training. Each
variant is evaluated with ``moekit.evaluation``: held-out bits per byte (bootstrap 95% CI over
documents), next-line multiple choice, and greedy continuation agreement with the seed's original
model (plus the repetition rate of the generated text, the failure mode of lost super experts).
The report pairs every comparison across seeds (``moekit.confidence``). With ``model`` set
(``--model DIR``) nothing is trained: ``moekit.experiments.compression_model`` compresses that model.

Methods keep their papers' output form: pruning (frequency, EAN, REAP, NAEE, random) drops router
rows (plain form); merging (M-SMoE, HC-SMoE, uniform) and MoNE keep the router (exact form);
M-SMoE uses its global budget with the same total expert count, the others REAP's uniform rule.
Super experts are protected for every method but M-SMoE (whose paper does not).
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..data.stdlib_corpus import load_stdlib_corpus, random_windows
from ..merging.cost import count_parameters
from ..merging.methods.base import option_names
from ..merging.pipeline import CompressionSpec, moekit_stack, run_pipeline
from ..merging.recovery import recover
from ..models.lm import MoELM
from ..models.lm_train import train_lm
from ..progress import Progress
from ..reporting import atomic_directory, write_json
from .common import TIMING_KEY, pinned_threads, results_header, start_run

__all__ = ["METHODS", "FORMS", "CompressionConfig", "compress", "run_compression"]

PAPER = "https://arxiv.org/abs/2510.13999"

#: method -> one line (the registry's summary, with the paper)
METHODS: dict[str, str] = {
    "frequency": "prune the least-routed experts",
    "ean": "prune the smallest summed expert output norms (REAP's EAN baseline)",
    "reap": "prune the smallest mean gate x output norm (REAP, renormalised top-k gates)",
    "mone": "prune low-usage stable experts, replace each by its mean output (MoNE)",
    "nae": "keep the expert subset that best reconstructs each layer's output (NAEE)",
    "hc-smoe": "cluster experts by mean output (average linkage), frequency-weighted merge (HC-SMoE)",
    "m-smoe": "frequency-chosen dominants, router-logit grouping, aligned frequency merge (M-SMoE)",
    "random": "control: prune a seeded random subset",
    "uniform": "control: equal-weight merge of seeded random equal-size groups",
}
#: output form per method (pruning: plain, the default)
FORMS = {"mone": "exact", "hc-smoe": "exact", "m-smoe": "exact", "uniform": "exact"}
NONE = "none"
STDLIB = "stdlib"


@dataclass(frozen=True)
class CompressionConfig:
    """Sizes and schedule; ``quick()`` is a smoke run for tests."""

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    removed: tuple[float, ...] = (0.25, 0.5)
    corpus_bytes: int = 4_000_000
    dim: int = 64
    depth: int = 3
    heads: int = 4
    hidden: int = 128
    num_experts: int = 8
    k: int = 2
    seq_len: int = 64
    batch_size: int = 16
    train_steps: int = 500
    lr: float = 3e-3
    aux_switch: float = 0.01
    calib_sequences: int = 64
    recovery_steps: int = 30
    recovery_lr: float = 5e-4
    alpha: float = 0.2
    temperature: float = 2.0
    eval_documents: int = 24
    max_doc_bytes: int = 768
    items: int = 100
    prompts: int = 12
    prompt_length: int = 48
    new_tokens: int = 16
    n_resamples: int = 999
    threads: int = 1
    model: str | None = None
    calib: tuple[str, ...] = (STDLIB,)
    data: tuple[str, ...] = (STDLIB,)

    @classmethod
    def quick(cls) -> "CompressionConfig":
        return cls(
            seeds=(0,), corpus_bytes=400_000, dim=16, depth=2, heads=2, hidden=24, seq_len=64, batch_size=4,
            train_steps=10, calib_sequences=8, recovery_steps=2, eval_documents=4, max_doc_bytes=128, items=8,
            prompts=2, prompt_length=16, new_tokens=4, n_resamples=99,
        )  # fmt: skip

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods (--methods) {unknown} are unknown; choose from {', '.join(METHODS)}")
        if not self.seeds or not self.methods or not self.removed:
            raise ValueError("seeds, methods and removed (--seeds, --methods, --removed) must each name at least one value")
        if self.recovery_steps < 0:
            raise ValueError(f"recovery_steps (--recovery-steps) must be >= 0, got {self.recovery_steps}")
        if self.model is not None:
            from .compression_model import check_model_config

            return check_model_config(self)
        if self.calib != (STDLIB,) or self.data != (STDLIB,):
            raise ValueError(f"calib and data (--calib, --data) choose the data of a model (--model) run; the trained LM "
                             f"calibrates and is evaluated on the stdlib split, got calib={list(self.calib)}, "
                             f"data={list(self.data)}")  # fmt: skip
        bad = [r for r in self.removed if not 0 < r < 1 or int(self.num_experts * r) < 1]
        if bad:
            raise ValueError(f"removed fractions (--removed) must remove at least one of {self.num_experts} experts and keep "
                             f"one, got {bad}")  # fmt: skip

    def kept(self, removed: float) -> int:
        """Experts kept per layer when ``removed`` of them go (REAP: ``int(E * ratio)`` removed)."""
        return self.num_experts - int(self.num_experts * removed)


def spec_for(method: str, experts: int | float, seed: int) -> CompressionSpec:
    """How the comparison runs ``method``: ``experts`` kept per layer (int, or the fraction kept; M-SMoE:
    on average, its global budget), statistics of the original model, the method's output form, super
    experts protected but for M-SMoE; ``seed`` for the methods that draw at random."""
    declared = set(option_names(method))
    options: dict[str, Any] = {"seed": seed} if "seed" in declared else {}
    if method == "m-smoe":
        return CompressionSpec(method="m-smoe", method_options={"recipe": "mcsmoe", **options}, experts=experts,
                               budget="global", form="exact", propagate="original", protect_super_experts=False)  # fmt: skip
    return CompressionSpec(method=method, method_options=options, experts=experts, budget="uniform",
                           form=FORMS.get(method, "plain"), propagate="original")  # fmt: skip


def compress(model: nn.Module, method: str, experts: int, calib: list[Tensor], seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A compressed copy of ``model`` (``experts`` per layer, average for M-SMoE) and the pipeline report."""
    spec = spec_for(method, experts, seed)
    out = copy.deepcopy(model).eval()
    report = run_pipeline(moekit_stack(out), calib, spec)
    return out, {"form": spec.form, "budget": spec.budget, "counts": report["counts"], "kept": report["kept"],
                 "protected": report["protected"]}  # fmt: skip


def eval_settings(cfg: CompressionConfig, seed: int) -> Any:
    """The evaluation settings of seed ``seed`` (its items, prompts and bootstrap seed)."""
    from ..evaluation import EvalSettings

    return EvalSettings(seed=seed, documents=cfg.eval_documents, max_doc_bytes=cfg.max_doc_bytes, items=cfg.items,
                        prompts=cfg.prompts, prompt_length=cfg.prompt_length, new_tokens=cfg.new_tokens,
                        n_resamples=cfg.n_resamples)  # fmt: skip


def perplexity_metric(data: Any) -> str:
    """The perplexity metric the harness gives on ``data``: bits per byte on text, nats per token on
    token-id documents (no bytes to divide by)."""
    return "bits_per_byte" if data.has_text else "nll_per_token"


def variant_tasks(model: Any, reference: Any, data: Any, settings: Any) -> dict[str, Any]:
    """The harness's task results of ``model`` (a module or ``EvalModel``): perplexity, choice (text data
    only) and generation against ``reference`` (``moekit.evaluation.evaluate``'s ``runs[0]["tasks"]``)."""
    from ..evaluation import as_eval_model, evaluate

    m = as_eval_model(model, name="model")
    own = evaluate(m, data, tasks=("perplexity", "choice") if data.has_text else ("perplexity",),
                   settings=settings)["runs"][0]["tasks"]  # fmt: skip
    gen = evaluate(m, data, tasks=("generate",), reference=reference, settings=settings)["runs"][0]["tasks"]["generate"]
    return {**own, "generate": gen}


def variant_metrics(tasks: Mapping[str, Any], data: Any) -> dict[str, Any]:
    """The metrics a row keeps of ``variant_tasks`` (intervals as dicts)."""
    pick = {perplexity_metric(data): tasks["perplexity"], "acc": tasks.get("choice"), "acc_norm": tasks.get("choice"),
            **{m: tasks["generate"] for m in ("continuation_agreement", "top1_agreement", "kl", "repetition")}}  # fmt: skip
    return {name: task["metrics"][name] for name, task in pick.items() if task is not None}


def evaluate_variant(model: Any, reference: Any, data: Any, settings: Any) -> dict[str, Any]:
    """Held-out metrics of ``model`` (a module or ``EvalModel``; intervals as dicts): perplexity
    (``perplexity_metric``), choice accuracy (text data only) and generation against ``reference``."""
    return variant_metrics(variant_tasks(model, reference, data, settings), data)


def result_row(seed: int, method: str, removed: float, steps: int, experts_per_layer: list[int], params: int,
               metrics: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One variant's row of ``results["rows"]``."""
    return {
        "seed": seed, "method": method, "removed": removed, "recovery": steps > 0, "recovery_steps": steps,
        "experts_per_layer": list(experts_per_layer), "params": params,
        **{k: info[k] for k in ("form", "budget", "kept", "protected", "model_dir", "vs_original") if k in info},
        "metrics": dict(metrics),
    }  # fmt: skip


def _row(seed: int, method: str, removed: float, steps: int, model: nn.Module, metrics: Mapping[str, Any],
         info: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    counts = [getattr(b.moe.experts, "real_experts", b.moe.experts.num_experts) for b in model.blocks]
    return result_row(seed, method, removed, steps, counts, count_parameters(model), metrics, info)


def recovery_batches(data_N: Tensor, cfg: CompressionConfig, seed: int) -> list[Tensor]:
    """Seed ``seed``'s recovery batches: ``cfg.recovery_steps`` batches of random byte windows ``[B, S+1]``."""
    if not cfg.recovery_steps:
        return []
    windows = random_windows(data_N, cfg.recovery_steps * cfg.batch_size, cfg.seq_len,
                             torch.Generator().manual_seed(20_000 + seed))  # fmt: skip
    return list(windows.split(cfg.batch_size))


def recovered(model: nn.Module, teacher: nn.Module, batches: Sequence[Tensor], cfg: CompressionConfig,
              label: str) -> nn.Module:  # fmt: skip
    """A copy of ``model`` after ``cfg.recovery_steps`` steps of KD from ``teacher`` on ``batches`` (byte windows
    ``[B, S+1]``, one per step; routers frozen), the recovery every variant of a seed gets."""
    student = copy.deepcopy(model)
    recover(student, teacher, lambda step: batches[step], steps=cfg.recovery_steps, lr=cfg.recovery_lr, alpha=cfg.alpha,
            temperature=cfg.temperature, quiet=True, desc=label)  # fmt: skip
    return student


def run_seed(cfg: CompressionConfig, seed: int, corpus: Any, data: Any, task: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train one LM, compress it every way, recover, evaluate; ``(rows, timing)``."""
    from ..evaluation import wrap_model

    timing: dict[str, Any] = {}
    torch.manual_seed(seed)
    model = MoELM(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_seq_len=cfg.seq_len, num_experts=cfg.num_experts,
                  k=cfg.k, hidden=cfg.hidden)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    train_lm(model, lambda step: random_windows(corpus.train, cfg.batch_size, cfg.seq_len, gen), steps=cfg.train_steps,
             lr=cfg.lr, aux_weights={"switch": cfg.aux_switch}, quiet=True)  # fmt: skip
    timing["train_s"] = time.perf_counter() - t0
    model.eval()
    calib_gen = torch.Generator().manual_seed(10_000 + seed)
    calib = [w[:, :-1] for w in random_windows(corpus.train, cfg.calib_sequences, cfg.seq_len, calib_gen).split(cfg.batch_size)]
    recovery = recovery_batches(corpus.train, cfg, seed)
    reference = wrap_model(copy.deepcopy(model), name="original")
    settings = eval_settings(cfg, seed)
    rows: list[dict[str, Any]] = []

    def finish(label: str, method: str, removed: float, compressed: nn.Module, info: Mapping[str, Any]) -> None:
        t = time.perf_counter()
        rows.append(_row(seed, method, removed, 0, compressed, evaluate_variant(compressed, reference, data, settings),
                         info))  # fmt: skip
        if not cfg.recovery_steps:
            task.advance(note=f"seed {seed} {label}: {rows[-1]['metrics']['bits_per_byte']['estimate']:.3f} bits/byte")
            return
        student = recovered(compressed, model, recovery, cfg, label)
        rows.append(_row(seed, method, removed, cfg.recovery_steps, student,
                         evaluate_variant(student, reference, data, settings), info))  # fmt: skip
        timing[label] = {**timing.get(label, {}), "recover_and_eval_s": time.perf_counter() - t}
        task.advance(note=f"seed {seed} {label}: {rows[-2]['metrics']['bits_per_byte']['estimate']:.3f} -> "
                          f"{rows[-1]['metrics']['bits_per_byte']['estimate']:.3f} bits/byte")  # fmt: skip

    finish(NONE, NONE, 0.0, model, {"form": "-", "budget": "-", "kept": {}, "protected": None})
    for removed in cfg.removed:
        for method in cfg.methods:
            label = f"{method}@{removed:g}"
            t = time.perf_counter()
            compressed, info = compress(model, method, cfg.kept(removed), calib, seed)
            timing[label] = {"compress_s": time.perf_counter() - t}
            finish(label, method, removed, compressed, info)
    return rows, timing


def run_compression(cfg: CompressionConfig, out_dir: str | Path | None = None, *, progress: Progress | None = None,
                    command: str | None = None, smoke_run: bool = False, overwrite: bool = False,
                    keep_models: bool = False) -> dict[str, Any]:  # fmt: skip
    """Every seed, method and fraction; writes ``results.json``, ``report.md`` and PNGs when ``out_dir`` is set.
    ``keep_models`` (``cfg.model`` runs, needs ``out_dir``): the compressed models stay in ``out_dir/models``."""
    if keep_models and (cfg.model is None or out_dir is None):
        raise ValueError("keep_models (--keep-models) keeps the compressed models of a --model run; it needs model "
                         "and out_dir")  # fmt: skip
    progress = start_run(cfg, out_dir, overwrite=overwrite, progress=progress,
                         inputs=[cfg.model, *(s for s in (*cfg.calib, *cfg.data) if s != STDLIB)] if cfg.model else ())  # fmt: skip
    start = time.perf_counter()
    header = results_header("compression", PAPER, cfg, command=command, smoke_run=smoke_run)
    with ExitStack() as stack:
        out = None
        if out_dir is not None:
            out = stack.enter_context(atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_compression"))
        with pinned_threads(cfg.threads):
            if cfg.model is not None:
                from .compression_model import run_model

                rows, timing, data = run_model(cfg, progress, out / "models" if keep_models and out else None)
            else:
                rows, timing, data = _run_trained(cfg, progress)
        timing["total_s"] = time.perf_counter() - start
        results = {
            **header,
            "methods": {m: METHODS[m] for m in cfg.methods},
            "papers": {m: _paper(m) for m in cfg.methods},
            "data": data,
            "rows": rows,
            TIMING_KEY: timing,
        }
        if out is not None:
            from .compression_report import write_report

            write_json(out / "results.json", results)
            write_report(results, out)
    return results


def _run_trained(cfg: CompressionConfig, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every seed of the trained-LM comparison: ``(rows, timing, data description)``."""
    from ..evaluation import stdlib_heldout

    rows: list[dict[str, Any]] = []
    timing: dict[str, Any] = {"seeds": {}}
    per_seed = 1 + len(cfg.methods) * len(cfg.removed)
    with progress.task(len(cfg.seeds) * per_seed, "compression variants") as task:
        corpus = load_stdlib_corpus(max_bytes=cfg.corpus_bytes)
        data = stdlib_heldout(max_bytes=cfg.corpus_bytes)
        for seed in cfg.seeds:
            seed_rows, seed_timing = run_seed(cfg, seed, corpus, data, task)
            rows += seed_rows
            timing["seeds"][str(seed)] = seed_timing
    return rows, timing, {"corpus": corpus.describe(), "evaluation": describe_data(data.head(cfg.eval_documents)),
                          "perplexity_metric": "bits_per_byte"}  # fmt: skip


def describe_data(data: Any) -> dict[str, Any]:
    """The evaluation data's description without the (long) list of training files."""
    out = data.describe()
    if "split" not in out:
        return out
    split = dict(out["split"])
    split["train_documents"] = len(split.get("train_documents", []))
    return {**out, "split": split}


def _paper(method: str) -> str:
    from ..registry import EXPERT_METHODS

    return EXPERT_METHODS.entry(method).paper

