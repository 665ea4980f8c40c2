"""MC-SMoE's comparison on a byte-level MoE language model (Li et al., ICLR 2024,
https://arxiv.org/abs/2310.01334; the Switch / fairseq-GPT settings scaled down to a CPU).

For every seed: a new split of the Python standard library's source files (``heldout_split``: held-out
files drawn by the seed, never seen in training or calibration) and a new MoE LM trained from scratch
on the rest. Each variant (``VARIANTS``) merges a copy of it to an average of ``experts`` experts per
merged layer -- the first MoE layer is kept whole, as in the paper -- and then gets the *same* recovery:
``recovery_steps`` steps of LM loss + KD to the unmerged model on the same batches, routers frozen.
MC-SMoE compresses the M-SMoE merge (low rank + pruned sparse residual) and prunes during those same
steps, so it is step-matched with M-SMoE; the no-merge control runs them on the unmerged model.
Quality: bits per byte on the held-out documents (``moekit.evaluation.evaluate_perplexity``; every
document's bits are kept, for paired intervals over documents and seeds). Sizes (parameters, FLOPs per
token, checkpoint bytes) are measured on the models of the run. ``run_mcsmoe(cfg)`` returns the results
dict (layout: ``moekit.experiments.common``) and writes the report when given a directory.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..checkpoint import WEIGHTS_NAME, save_checkpoint
from ..data.stdlib_corpus import random_windows, stdlib_split
from ..evaluation.documents import Document, EvalData, char_start
from ..evaluation.lm import wrap_model
from ..evaluation.perplexity import evaluate_perplexity
from ..merging.compress import StructuredPruner, compress_experts
from ..merging.cost import count_parameters, lm_flops_per_token
from ..merging.packed import pack_compressed
from ..merging.pipeline import merge_moekit_model
from ..merging.recovery import recover
from ..models.lm import MoELM
from ..models.lm_train import train_lm
from ..progress import Progress
from ..reporting import atomic_directory, write_json
from .common import TIMING_KEY, checkpoint_entry, pinned_threads, results_header, save_run_models, start_run

__all__ = ["Variant", "VARIANTS", "CONTROLS", "McSmoeConfig", "SeedData", "heldout_split", "run_seed", "run_mcsmoe"]

PAPER = "https://arxiv.org/abs/2310.01334"


@dataclass(frozen=True)
class Variant:
    """One merged model: ``merge_moekit_model`` keywords; ``compress``: MC-SMoE's compression on top."""

    label: str
    method: str = "mcsmoe"
    budget: str = "global"
    options: Mapping[str, Any] = field(default_factory=dict)
    compress: bool = False


#: every merged variant, by id (each is recovered with the same steps and batches)
VARIANTS: dict[str, Variant] = {
    "msmoe": Variant("M-SMoE"),
    "prune": Variant("prune to the dominant experts", method="prune"),
    "uniform": Variant("uniform averaging", method="uniform"),
    "random": Variant("random grouping", method="random"),
    "no_align": Variant("M-SMoE w/o alignment", options={"align": False}),
    "uniform_budget": Variant("M-SMoE, uniform per-layer budget", budget="uniform"),
    "expert_output": Variant("M-SMoE, expert-output grouping", options={"grouping": "expert_output"}),
    "mcsmoe": Variant("MC-SMoE (M-SMoE + compression)", compress=True),
}

#: the unmerged models: the trained model, and the no-merge control (the same recovery steps, no merge)
CONTROLS: dict[str, str] = {"full": "full SMoE", "control": "full SMoE + the recovery steps (no merge)"}


@dataclass(frozen=True)
class McSmoeConfig:
    """Everything a run depends on. ``quick()`` is a seconds-long smoke run for tests.

    ``experts``: average experts per *merged* layer (global budget unless the variant says otherwise);
    ``keep_first``: the first MoE layer is not merged (the paper); ``anchor``: alignment anchor of the
    merged experts (``"first"``: each group's lowest id, as the official code; ``"dominant"``; or an
    id). Held-out data: ``test_files`` files drawn per seed from those of at least ``doc_bytes`` bytes,
    each scored on a span of ``doc_bytes`` bytes at a seeded offset. ``msmoe_merge_only`` also scores
    the M-SMoE merge before recovery.
    """

    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    corpus_bytes: int = 4_000_000
    test_files: int = 48
    doc_bytes: int = 2048
    dim: int = 64
    depth: int = 4
    heads: int = 4
    hidden: int = 128
    num_experts: int = 8
    k: int = 2
    seq_len: int = 64
    batch_size: int = 32
    train_steps: int = 400
    lr: float = 3e-3
    aux_switch: float = 0.01
    calib_sequences: int = 64
    experts: int = 2
    keep_first: bool = True
    anchor: str = "first"
    recovery_steps: int = 50
    recovery_lr: float = 1e-3
    alpha: float = 0.2
    temperature: float = 2.0
    rank: int = 8
    final_ratio: float = 0.1
    msmoe_merge_only: bool = True
    threads: int = 1

    @classmethod
    def quick(cls) -> "McSmoeConfig":
        return cls(seeds=(0,), corpus_bytes=300_000, test_files=6, doc_bytes=256, dim=32, depth=2, heads=2,
                   hidden=64, seq_len=32, batch_size=8, train_steps=20, calib_sequences=8, recovery_steps=4,
                   rank=4)  # fmt: skip

    def check(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if not self.variants or not self.seeds:
            raise ValueError(f"need at least one variant and one seed, got variants={self.variants}, seeds={self.seeds}")
        for name, values in (("seeds", self.seeds), ("variants", self.variants)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct, got {values}")
        for name in ("test_files", "dim", "depth", "heads", "hidden", "num_experts", "k", "batch_size",
                     "train_steps", "calib_sequences", "experts", "recovery_steps", "rank", "threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.doc_bytes < 2 * self.seq_len:
            raise ValueError(f"doc_bytes must be >= 2 * seq_len = {2 * self.seq_len}, got {self.doc_bytes}")
        if not self.experts <= self.num_experts:
            raise ValueError(f"experts must be <= num_experts={self.num_experts}, got {self.experts}")
        if self.keep_first and self.depth < 2:
            raise ValueError("keep_first needs depth >= 2 (otherwise no layer is merged)")
        if not 0 < self.final_ratio <= 1:
            raise ValueError(f"final_ratio must be in (0, 1], got {self.final_ratio}")
        if self.anchor not in ("first", "dominant") and not str(self.anchor).isdigit():
            raise ValueError(f"anchor must be 'first', 'dominant' or an expert id, got {self.anchor!r}")

    @property
    def merge_anchor(self) -> str | int:
        return int(self.anchor) if str(self.anchor).isdigit() else self.anchor


@dataclass(frozen=True)
class SeedData:
    """One seed's split: training bytes ``[N]`` (uint8) and the held-out documents."""

    train: Tensor
    heldout: EvalData
    train_files: int


def heldout_split(cfg: McSmoeConfig, seed: int) -> SeedData:
    """The corpus files (``stdlib_split``'s selection, up to ``corpus_bytes``) split anew by ``seed``:
    ``test_files`` files drawn from those of at least ``doc_bytes`` bytes are held out (each gives one
    document, a span of ``doc_bytes`` bytes at a seeded offset, cut at UTF-8 character starts); every
    other file is training text."""
    files, digest = stdlib_split(max_bytes=cfg.corpus_bytes)
    gen = torch.Generator().manual_seed(seed)
    eligible = [i for i, f in enumerate(files) if len(f.data) >= cfg.doc_bytes]
    if len(eligible) < cfg.test_files + 1:
        raise ValueError(f"test_files={cfg.test_files} needs more corpus files of >= {cfg.doc_bytes} bytes "
                         f"(there are {len(eligible)}); raise corpus_bytes or lower doc_bytes")  # fmt: skip
    chosen = sorted(eligible[i] for i in torch.randperm(len(eligible), generator=gen)[: cfg.test_files].tolist())
    docs = []
    for i in chosen:
        data = files[i].data
        start = char_start(data, int(torch.randint(0, len(data) - cfg.doc_bytes + 1, (1,), generator=gen)))
        end = char_start(data, min(start + cfg.doc_bytes, len(data)))
        docs.append(Document(files[i].path, text=data[start:end]))
    held = set(chosen)
    train = b"".join(f.data for i, f in enumerate(files) if i not in held)
    source = {"name": "stdlib", "corpus_sha256": digest, "split_seed": seed, "files": len(files),
              "rule": "held-out files drawn by the seed; one span of doc_bytes per file"}  # fmt: skip
    return SeedData(torch.frombuffer(bytearray(train), dtype=torch.uint8), EvalData(tuple(docs), source),
                    len(files) - len(held))  # fmt: skip


def _batches(data: Tensor, cfg: McSmoeConfig, seed: int) -> Callable[[int], Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return lambda step: random_windows(data, cfg.batch_size, cfg.seq_len, gen)


def _sizes(model: nn.Module, cfg: McSmoeConfig) -> dict[str, Any]:
    """Parameters (stored: pruned rows not counted), expert parameters, FLOPs per token and the
    ``model.safetensors`` bytes of ``save_checkpoint``, measured on ``model``."""
    with tempfile.TemporaryDirectory() as tmp:
        size = (save_checkpoint(model, Path(tmp) / "ckpt") / WEIGHTS_NAME).stat().st_size
    return {
        "params": count_parameters(model),
        "expert_params": sum(count_parameters(b.moe.experts) for b in model.blocks),
        "flops_per_token": lm_flops_per_token(model, cfg.seq_len),
        "experts_per_layer": [b.moe.experts.num_experts for b in model.blocks],
        "checkpoint_bytes": size,
    }


def _score(model: nn.Module, data: EvalData) -> tuple[list[float], list[int], float]:
    """Held-out bits and predicted bytes of every document (in ``data``'s order), and the seconds it took."""
    result = evaluate_perplexity(wrap_model(model), data, n_resamples=199)  # its own CI is not used
    ids = [u["id"] for u in result["per_unit"]]
    if ids != [d.id for d in data.documents] or result["skipped"]:
        raise RuntimeError(f"evaluation skipped documents: {result['skipped']}")
    units = result["per_unit"]
    return [float(u["bits"]) for u in units], [int(u["bytes"]) for u in units], float(result["seconds"])


def run_seed(cfg: McSmoeConfig, seed: int, advance: Callable[[str], None] | None = None,
             keep: dict[str, nn.Module] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """One seed: train, merge every variant, recover, score. Returns ``(record, timing)``; into ``keep``,
    every scored model except the compressed ones goes by name (saved for ``moekit analyze``)."""
    advance = advance or (lambda note: None)
    data = heldout_split(cfg, seed)
    timing: dict[str, Any] = {}
    torch.manual_seed(seed)
    model = MoELM(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_seq_len=cfg.seq_len,
                  num_experts=cfg.num_experts, k=cfg.k, hidden=cfg.hidden, experts="glu")  # fmt: skip
    t0 = time.perf_counter()
    losses = train_lm(model, _batches(data.train, cfg, seed), steps=cfg.train_steps, lr=cfg.lr,
                      aux_weights={"switch": cfg.aux_switch}, quiet=True)  # fmt: skip
    timing["train_s"] = time.perf_counter() - t0
    model.eval()
    advance(f"seed {seed}: trained (loss {losses[-1]:.3f})")
    calib = random_windows(data.train, cfg.calib_sequences, cfg.seq_len, torch.Generator().manual_seed(seed + 1))
    calib_batches = [c[:, :-1] for c in calib.split(cfg.batch_size)]
    exclude = ["blocks.0.moe"] if cfg.keep_first else []
    models: dict[str, dict[str, Any]] = {}

    scored_bytes: list[int] = []

    def score(name: str, net: nn.Module) -> None:
        bits, nbytes, seconds = _score(net, data.heldout)
        if scored_bytes and nbytes != scored_bytes:
            raise RuntimeError(f"{name} was scored on other bytes than the full model")
        scored_bytes[:] = nbytes
        models[name] = {"bits": bits, **_sizes(net, cfg)}
        if keep is not None and not (name in VARIANTS and VARIANTS[name].compress):
            keep[name] = net
        timing[f"{name}/eval_s"] = seconds
        advance(f"seed {seed}: {name} {sum(bits) / sum(nbytes):.4f} bpb")

    def recovered(student: nn.Module, name: str, after_step: Callable[[int], None] | None = None) -> None:
        torch.manual_seed(seed + 2)  # every variant: the same batches, and the same random state
        t = time.perf_counter()
        recover(student, model, _batches(data.train, cfg, seed + 2), steps=cfg.recovery_steps, lr=cfg.recovery_lr,
                alpha=cfg.alpha, temperature=cfg.temperature, after_step=after_step, quiet=True)  # fmt: skip
        timing[f"{name}/recover_s"] = time.perf_counter() - t

    score("full", model)
    control = copy.deepcopy(model)
    recovered(control, "control")
    score("control", control.eval())
    for name in cfg.variants:
        v = VARIANTS[name]
        t = time.perf_counter()
        merged = merge_moekit_model(model, calib_batches, experts=cfg.experts, method=v.method, budget=v.budget,
                                    exclude=exclude, quiet=True, seed=seed, anchor=cfg.merge_anchor,
                                    **v.options)  # fmt: skip
        timing[f"{name}/merge_s"] = time.perf_counter() - t
        if name == "msmoe" and cfg.msmoe_merge_only:
            score("msmoe_merge_only", merged.eval())
        if v.compress:
            student = compress_experts(merged, cfg.rank)
            steps = cfg.recovery_steps
            pruner = StructuredPruner(student, steps=steps, final_ratio=cfg.final_ratio,
                                      initial_warmup=max(1, steps // 10), final_warmup=max(1, steps // 5))  # fmt: skip
            recovered(student, name, after_step=pruner.step)
            merged = pack_compressed(student, inplace=True)  # only the kept residual rows are stored
        else:
            recovered(merged, name)
        score(name, merged.eval())
    record = {
        "seed": seed, "train_files": data.train_files, "train_bytes": int(data.train.numel()),
        "documents": [d.id for d in data.heldout.documents], "bytes": scored_bytes,
        "heldout_sha256": data.heldout.digest, "heldout_source": data.heldout.source,
        "train_loss_first_last": [losses[0], losses[-1]], "models": models,
    }  # fmt: skip
    return record, timing


def model_names(cfg: McSmoeConfig | Mapping[str, Any]) -> list[str]:
    """Every scored model of a run, in order: the controls, the merge-only M-SMoE, the variants."""
    get = (lambda k: cfg[k]) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k))
    names = list(CONTROLS)
    if "msmoe" in get("variants") and get("msmoe_merge_only"):
        names.append("msmoe_merge_only")
    return names + list(get("variants"))


def run_mcsmoe(cfg: McSmoeConfig, out_dir: str | Path | None = None, *, progress: Progress | None = None,
               command: str | None = None, smoke_run: bool = False, overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run every seed; write ``results.json``, ``report.md`` and PNGs when ``out_dir`` is set."""
    progress = start_run(cfg, out_dir, overwrite=overwrite, progress=progress)
    seeds, timing, saved = [], {"seeds": {}}, {}
    start = time.perf_counter()
    per_seed = 1 + len(model_names(cfg))
    with pinned_threads(cfg.threads), progress.task(len(cfg.seeds) * per_seed, "mcsmoe steps") as task:
        header = results_header("mcsmoe", PAPER, cfg, command=command, smoke_run=smoke_run)
        for seed in cfg.seeds:
            keep = saved if seed == cfg.seeds[0] and out_dir is not None else None
            record, seed_timing = run_seed(cfg, seed, lambda note: task.advance(note=note), keep=keep)
            seeds.append(record)
            timing["seeds"][str(seed)] = seed_timing
            progress.echo(f"seed {seed}: " + ", ".join(
                f"{name} {sum(m['bits']) / sum(record['bytes']):.4f}" for name, m in record["models"].items()))  # fmt: skip
    timing["total_s"] = time.perf_counter() - start
    results = {
        **header,
        "variants": {name: VARIANTS[name].label for name in cfg.variants},
        "controls": dict(CONTROLS),
        "models": model_names(cfg),
        "seeds": seeds,
        "eval_set": EVAL_SET,
        "runs": [{"name": run, "model": name, "checkpoint": checkpoint_entry(run)}
                 for name, run in ((n, f"{n}-s{cfg.seeds[0]}") for n in saved)],
        TIMING_KEY: timing,
    }  # fmt: skip
    if out_dir is not None:
        from .mcsmoe_report import write_report

        with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_mcsmoe") as out:
            save_run_models(out, {f"{n}-s{cfg.seeds[0]}": m for n, m in saved.items()},
                            {EVAL_SET: _heldout_eval_set(cfg, cfg.seeds[0])})  # fmt: skip
            write_json(out / "results.json", results)
            write_report(results, out)
    return results


#: the first seed's held-out documents as byte windows, for ``moekit analyze`` of its saved models
EVAL_SET = "eval_set.safetensors"


def _heldout_eval_set(cfg: McSmoeConfig, seed: int) -> Any:
    """Windows of ``cfg.seq_len`` bytes over the seed's held-out documents (never trained on)."""
    from ..analysis.target import byte_eval_set

    data = heldout_split(cfg, seed)
    text = b"".join(d.text or b"" for d in data.heldout.documents)
    windows = max(1, len(text) // cfg.seq_len)
    return byte_eval_set(torch.frombuffer(bytearray(text), dtype=torch.uint8), seq_len=cfg.seq_len, samples=windows,
                         name="held-out stdlib files",
                         description=f"windows of {cfg.seq_len} bytes of the {len(data.heldout.documents)} held-out "
                         f"documents of seed {seed} (files the models never trained on)")  # fmt: skip
