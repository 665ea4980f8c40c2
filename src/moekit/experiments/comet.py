"""The COMET paper's gate comparison (Ibrahim et al., KDD 2023, https://arxiv.org/abs/2306.02824) on
multi-gate multi-task models.

Gates softmax, top-k, hash, DSelect-k and COMET, each sparse gate also with permutation local search
("+"), are tuned by random search on each data set (Ma et al.'s synthetic regression tasks and
MultiDigits; MultiMNIST / MultiFashion too when ``idx_dir`` holds the IDX files), in several search
*replicates*. A replicate draws a new data set (its seed) and one list of hyperparameter draws shared
by every gate: trial i of every gate uses the same learning rate (and the same gamma and entropy
coefficient where a gate has them, the same local-search length for the "+" gates) and the same
initialisation seed, so gates are compared on equal budgets and paired trial by trial. As in the
paper, the "+" variants of DSelect-k and COMET fix gamma (``plus_gamma``) instead of searching it,
hash routing sends each example to one fixed random expert (k = 1), and top-k has no noise and no
balancing loss. Each trial trains with early stopping on the validation loss and records its routing
on the validation set (used to decide whether the trained gate is k-sparse) and on the test set.
``run_comet(cfg)`` returns the results dict and writes the report when given a directory, with the
best trial of every gate and data set in the first replicate (``checkpoints/<data set>-<gate>``) and
that replicate's test sets (``eval_sets/<data set>.safetensors``) for ``moekit analyze``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.idx import load_mnist
from ..data.multidigits import make_multidigits, overlay_split
from ..data.synthetic_multitask import MultiTaskSplit, make_synthetic_multitask
from ..models.multitask import MultiGateMoE, MultiTaskOutput
from ..progress import Progress
from ..reporting import atomic_directory, write_json
from ..routers import COMETRouter, DSelectKRouter, HashRouter, PermutationLocalSearch, Router, SoftmaxRouter, TopKRouter
from ..training import training_steps
from .common import TIMING_KEY, checkpoint_entry, pinned_threads, results_header, save_run_models, start_run

__all__ = ["CometConfig", "DatasetSpec", "DATASETS", "GATES", "draw_hparams", "gate_hparams", "build_gate",
           "gate_spec", "load_dataset", "run_trial", "run_comet"]  # fmt: skip

PAPER = "https://arxiv.org/abs/2306.02824"
GATES = ("softmax", "topk", "topk+", "hash", "hash+", "dselect", "dselect+", "comet", "comet+")


@dataclass(frozen=True)
class DatasetSpec:
    """Experts and cardinality per data set (the paper's MultiMNIST / MultiFashion settings where known)."""

    num_experts: int
    k: int


DATASETS = {
    "synthetic": DatasetSpec(8, 2),
    "multidigits": DatasetSpec(6, 2),
    "multimnist": DatasetSpec(16, 4),
    "multifashion": DatasetSpec(6, 2),
}


@dataclass(frozen=True)
class CometConfig:
    """Everything a run depends on. ``quick()`` is a seconds-long smoke run for tests.

    ``replicates``: one seed per search replicate (data set and hyperparameter draws). ``trials``: random-
    search trials per gate and replicate. ``top_fraction``: the paper's "best 5% by validation loss" (at
    least one trial). ``sparse_threshold``: a trial's gates count as k-sparse when every task gate routes at
    least this fraction of the *validation* examples to at most k experts.
    """

    datasets: tuple[str, ...] = ("synthetic", "multidigits")
    gates: tuple[str, ...] = GATES
    replicates: tuple[int, ...] = (0, 1, 2, 3)
    trials: int = 12
    epochs: int = 8
    batch_size: int = 128
    expert_hidden: int = 32
    expert_dim: int = 16
    tower_hidden: int = 16
    synthetic_samples: int = 4000
    synthetic_correlation: float = 0.5
    overlay_sizes: tuple[int, int, int] = (3000, 750, 750)
    idx_dir: str | None = None
    top_fraction: float = 0.05
    sparse_threshold: float = 0.9
    lr_range: tuple[float, float] = (5e-4, 1e-2)
    gamma_range: tuple[float, float] = (0.001, 1.0)
    plus_gamma: float = 0.01
    entropy_range: tuple[float, float] = (1e-3, 3.0)
    local_search_range: tuple[float, float] = (0.02, 0.2)
    perm_entropy: float = 1e-4
    unreachable: float = 1.0
    threads: int = 1

    @classmethod
    def quick(cls) -> "CometConfig":
        return cls(replicates=(0,), trials=2, epochs=1, synthetic_samples=300, overlay_sizes=(200, 60, 60),
                   batch_size=64)  # fmt: skip

    def check(self) -> None:
        unknown = [g for g in self.gates if g not in GATES] + [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise ValueError(f"unknown gates/datasets {unknown}; gates: {list(GATES)}, datasets: {list(DATASETS)}")
        for name in ("trials", "epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.replicates or len(set(self.replicates)) != len(self.replicates):
            raise ValueError(f"replicates must be distinct seeds (at least one), got {self.replicates}")
        if not self.plus_gamma > 0:
            raise ValueError(f"plus_gamma must be > 0, got {self.plus_gamma}")


def _log_uniform(gen: torch.Generator, low: float, high: float) -> float:
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand((), generator=gen)))


def draw_hparams(cfg: CometConfig, seed: int) -> list[dict[str, float]]:
    """One replicate's random-search draws, ``cfg.trials`` of them, shared by every gate (``gate_hparams``
    picks what a gate uses): learning rate, gamma, entropy coefficient and local-search fraction."""
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(cfg.trials):
        low, high = cfg.local_search_range
        draws.append({"lr": _log_uniform(gen, *cfg.lr_range), "gamma": _log_uniform(gen, *cfg.gamma_range),
                      "entropy": _log_uniform(gen, *cfg.entropy_range),
                      "local_search_fraction": low + (high - low) * float(torch.rand((), generator=gen))})  # fmt: skip
    return draws


def gate_hparams(gate: str, draw: dict[str, float], cfg: CometConfig) -> dict[str, float]:
    """The hyperparameters ``gate`` searches, from one shared draw: lr for every gate; gamma (searched for
    the plain gates, ``plus_gamma`` for "+") and the entropy coefficient for DSelect-k / COMET; the
    fraction of training that learns the permutation for "+" gates."""
    hp = {"lr": draw["lr"]}
    if gate.rstrip("+") in ("dselect", "comet"):
        hp["gamma"] = cfg.plus_gamma if gate.endswith("+") else draw["gamma"]
        hp["entropy"] = draw["entropy"]
    if gate.endswith("+"):
        hp["local_search_fraction"] = draw["local_search_fraction"]
    return hp


def gate_k(gate: str, spec: DatasetSpec) -> int:
    """Experts per example: the data set's k, except hash routing (one expert, as the paper's Hash-r)."""
    return 1 if gate.rstrip("+") == "hash" else spec.k


def build_gate(gate: str, hp: dict[str, float], *, dim: int, spec: DatasetSpec, num_keys: int, learn_steps: int,
               seed: int) -> Router:  # fmt: skip
    """One task gate by experiment name (``"comet+"`` = COMET wrapped in permutation local search)."""
    base, n, k = gate.rstrip("+"), spec.num_experts, gate_k(gate, spec)
    if base == "softmax":
        router: Router = SoftmaxRouter(dim, n)
    elif base == "topk":
        router = TopKRouter(dim, n, k, noisy=False)  # the paper's top-k runs: no jitter, no balancing loss
    elif base == "hash":
        router = HashRouter(dim, n, num_keys, k, key="example_id", seed=seed)
    elif base == "dselect":
        router = DSelectKRouter(dim, n, k, gamma=hp["gamma"])
    elif base == "comet":
        router = COMETRouter(dim, n, k, gamma=hp["gamma"])
    else:
        raise ValueError(f"gate must be one of {list(GATES)}, got {gate!r}")
    if gate.endswith("+"):
        router = PermutationLocalSearch(router, learn_steps=learn_steps)
    return router


def gate_spec(gate: str, hp: dict[str, float], *, spec: DatasetSpec, num_keys: int, learn_steps: int,
              seed: int) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """``(router registry name, kwargs)`` that rebuild ``build_gate``'s gate (a saved checkpoint's config)."""
    base, k = gate.rstrip("+"), gate_k(gate, spec)
    kwargs: dict[str, Any] = {
        "softmax": {}, "topk": {"k": k, "noisy": False}, "dselect": {"k": k, "gamma": hp.get("gamma")},
        "comet": {"k": k, "gamma": hp.get("gamma")},
        "hash": {"num_keys": num_keys, "k": k, "key": "example_id", "seed": seed},
    }[base]  # fmt: skip
    if gate.endswith("+"):
        inner = {n: v for n, v in kwargs.items() if n != "k"}
        return "local_search", {"k": k, "base": base, "base_kwargs": inner, "learn_steps": learn_steps}
    return base, kwargs


def load_dataset(name: str, cfg: CometConfig, seed: int) -> MultiTaskSplit:
    if name == "synthetic":
        return make_synthetic_multitask(cfg.synthetic_samples, correlation=cfg.synthetic_correlation, seed=seed)
    n_tr, n_va, n_te = cfg.overlay_sizes
    if name == "multidigits":
        return make_multidigits(n_tr, n_va, n_te, seed=seed)
    if name in ("multimnist", "multifashion"):
        if cfg.idx_dir is None:
            raise ValueError(f"dataset {name!r} needs idx_dir, a directory with the MNIST / Fashion-MNIST IDX files")
        images, labels = load_mnist(Path(cfg.idx_dir) / name.replace("multi", ""), "train")
        return overlay_split(images, labels, num_train=n_tr, num_val=n_va, num_test=n_te, shift=4, seed=seed)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


def _example_ids(data: MultiTaskSplit) -> dict[str, Tensor]:
    """A distinct id per example (train, then validation, then test): the hash routers' keys."""
    n_tr, n_va, n_te = data.x_train.shape[0], data.x_val.shape[0], data.x_test.shape[0]
    return {"train": torch.arange(n_tr), "val": torch.arange(n_tr, n_tr + n_va),
            "test": torch.arange(n_tr + n_va, n_tr + n_va + n_te)}  # fmt: skip


def _batches(n: int, size: int, gen: torch.Generator | None = None) -> list[Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


def _loss(model: MultiGateMoE, out: MultiTaskOutput, ys: list[Tensor], hp: dict[str, float],
          cfg: CometConfig) -> Tensor:  # fmt: skip
    total = sum(model.task_losses(out, ys), torch.zeros(()))
    for moe in out.moe:
        total = total + hp.get("entropy", 0.0) * moe.aux.get("entropy_reg", 0.0)
        total = total + cfg.unreachable * moe.aux.get("unreachable", 0.0)
        total = total + cfg.perm_entropy * moe.aux.get("perm_entropy", 0.0)
    return total


@torch.no_grad()
def evaluate(model: MultiGateMoE, x: Tensor, ys: list[Tensor], ids: Tensor, k: int) -> dict[str, Any]:
    """Per-task loss and metric, and per-gate routing: slots (experts run) and gate weight per expert,
    experts run per example, fraction of examples routed to at most ``k`` experts."""
    model.eval()
    T = len(model.tasks)
    loss_sum, metric_sum = [0.0] * T, [0.0] * T
    counts = torch.zeros(T, model.experts.num_experts)
    weight = torch.zeros(T, model.experts.num_experts)
    run, hard = [0.0] * T, [0.0] * T
    for idx in _batches(x.shape[0], 1024):
        out = model(x[idx], meta={"example_id": ids[idx]})
        targets = [y[idx] for y in ys]
        for t, (l, m) in enumerate(zip(model.task_losses(out, targets), model.task_metrics(out, targets))):
            loss_sum[t] += float(l) * len(idx)
            metric_sum[t] += m * len(idx)
        for t, moe in enumerate(out.moe):
            d = moe.decision
            kept = d.kept_mask() & (d.effective_weights() != 0)
            counts[t] += torch.bincount(d.ids_TK[kept], minlength=d.num_experts).float()
            weight[t] += d.gates_TE().float().sum(0)
            per_example = kept.sum(-1)
            run[t] += float(per_example.sum())
            hard[t] += float((per_example <= k).sum())
    n = x.shape[0]
    return {"loss": [v / n for v in loss_sum], "metric": [v / n for v in metric_sum],
            "slots_per_expert": counts.tolist(), "weight_per_expert": weight.tolist(),
            "experts_per_example": [v / n for v in run], "fraction_hard": [v / n for v in hard]}  # fmt: skip


def run_trial(data: MultiTaskSplit, gate: str, hp: dict[str, float], spec: DatasetSpec, cfg: CometConfig, *,
              seed: int, hash_seed: int) -> tuple[dict[str, Any], tuple[MultiGateMoE, str, dict[str, Any]] | None]:  # fmt: skip
    """Train one configuration; keep the epoch with the lowest validation loss (sum over tasks); record
    validation and test results of that epoch (train time under ``"timing"``). Also returns the trained
    model with its checkpoint builder and config (``save_run_models``), None when every epoch diverged."""
    torch.manual_seed(seed)
    ids = _example_ids(data)
    k = gate_k(gate, spec)
    steps_per_epoch = math.ceil(data.x_train.shape[0] / cfg.batch_size)
    learn_steps = max(1, round(hp.get("local_search_fraction", 0.0) * steps_per_epoch * cfg.epochs))
    num_keys = int(ids["test"][-1]) + 1
    # the same random expert per example for every task gate (one hash table per replicate)
    gates = [build_gate(gate, hp, dim=data.num_features, spec=spec, num_keys=num_keys, learn_steps=learn_steps,
                        seed=hash_seed) for _ in data.tasks]  # fmt: skip
    model = MultiGateMoE(data.num_features, data.tasks, num_experts=spec.num_experts, expert_dim=cfg.expert_dim,
                         expert_hidden=cfg.expert_hidden, tower_hidden=cfg.tower_hidden, gates=gates)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, int, dict[str, Tensor]] | None = None

    def step_loss(idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = model(data.x_train[idx], meta={"example_id": ids["train"][idx]})
        return _loss(model, out, [y[idx] for y in data.ys_train], hp, cfg), {}

    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        for _ in training_steps(_batches(data.x_train.shape[0], cfg.batch_size, gen), step_loss, opt):
            pass
        val_loss = sum(evaluate(model, data.x_val, data.ys_val, ids["val"], k)["loss"])
        if math.isfinite(val_loss) and (best is None or val_loss < best[0]):
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
    timing = {"train_s": time.perf_counter() - start}
    if best is None:  # diverged at every epoch
        return {"gate": gate, "hparams": hp, "val_loss": None, "best_epoch": None, "val": None, "test": None,
                TIMING_KEY: timing}, None  # fmt: skip
    model.load_state_dict(best[2])
    val = evaluate(model, data.x_val, data.ys_val, ids["val"], k)
    test = evaluate(model, data.x_test, data.ys_test, ids["test"], k)
    router, router_kwargs = gate_spec(gate, hp, spec=spec, num_keys=num_keys, learn_steps=learn_steps, seed=hash_seed)
    config = {"in_dim": data.num_features, "tasks": [asdict(t) for t in data.tasks], "num_experts": spec.num_experts,
              "expert_dim": cfg.expert_dim, "expert_hidden": cfg.expert_hidden, "tower_hidden": cfg.tower_hidden,
              "router": router, "router_kwargs": router_kwargs}  # fmt: skip
    return {"gate": gate, "hparams": hp, "val_loss": best[0], "best_epoch": best[1] + 1, "val": val, "test": test,
            TIMING_KEY: timing}, (model, "mmoe", config)  # fmt: skip


def run_comet(cfg: CometConfig, out_dir: str | Path | None = None, *, progress: Progress | None = None,
              command: str | None = None, smoke_run: bool = False,
              overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run every data set, replicate, gate and trial; write the report when ``out_dir`` is set."""
    progress = start_run(cfg, out_dir, overwrite=overwrite, progress=progress)
    datasets: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []  # the best trial of each gate and data set in the first replicate
    models: dict[str, Any] = {}
    eval_sets: dict[str, Any] = {}
    timing: dict[str, Any] = {"search_s": {}}
    start = time.perf_counter()
    total = len(cfg.datasets) * len(cfg.replicates) * len(cfg.gates) * cfg.trials
    with pinned_threads(cfg.threads), progress.task(total, "comet trials") as task:
        header = results_header("comet", PAPER, cfg, command=command, smoke_run=smoke_run)
        for name in cfg.datasets:
            spec, replicates = DATASETS[name], []
            for rep in cfg.replicates:
                data = load_dataset(name, cfg, rep)
                draws = draw_hparams(cfg, 1_000_003 * rep + 7)
                trials: dict[str, list[dict[str, Any]]] = {}
                for gate in cfg.gates:
                    trials[gate] = []
                    best_run: tuple[float, int, Any] | None = None
                    for i, draw in enumerate(draws):
                        trial, saved = run_trial(data, gate, gate_hparams(gate, draw, cfg), spec, cfg,
                                                 seed=10_007 * rep + i, hash_seed=rep)  # fmt: skip
                        if rep == cfg.replicates[0] and saved is not None and (
                                best_run is None or trial["val_loss"] < best_run[0]):  # fmt: skip
                            best_run = (trial["val_loss"], i, saved)
                        seconds = trial.pop(TIMING_KEY)["train_s"]
                        timing["search_s"][f"{name}/r{rep}/{gate}"] = timing["search_s"].get(
                            f"{name}/r{rep}/{gate}", 0.0) + seconds  # fmt: skip
                        trials[gate].append(trial)
                        task.advance(note=f"{name} replicate {rep} {gate}")
                    if best_run is not None:  # saved for moekit analyze
                        run_name = f"{name}-{gate.replace('+', '-plus')}"
                        models[run_name] = best_run[2]
                        runs.append({"name": run_name, "dataset": name, "gate": gate, "replicate": rep,
                                     "trial": best_run[1], "val_loss": best_run[0],
                                     "checkpoint": checkpoint_entry(run_name), "eval_set": f"eval_sets/{name}.safetensors"})  # fmt: skip
                    losses = [t["val_loss"] for t in trials[gate] if t["val_loss"] is not None]
                    progress.echo(f"{name:<12} replicate {rep} {gate:<9} best val loss "
                                  f"{min(losses) if losses else float('nan'):.4f}")  # fmt: skip
                replicates.append({"seed": rep, "sizes": [data.x_train.shape[0], data.x_val.shape[0],
                                                          data.x_test.shape[0]], "trials": trials})  # fmt: skip
                if rep == cfg.replicates[0]:
                    eval_sets[f"eval_sets/{name}.safetensors"] = _eval_set(name, data, rep)
            datasets[name] = {"tasks": [asdict(t) for t in data.tasks], "metric": data.tasks[0].metric,
                              "num_experts": spec.num_experts, "k": spec.k, "features": data.num_features,
                              "replicates": replicates}  # fmt: skip
    timing["total_s"] = time.perf_counter() - start
    results = {**header, "datasets": datasets, "runs": runs, TIMING_KEY: timing}
    if out_dir is not None:
        from .comet_report import write_report

        with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", writer="run_comet") as out:
            save_run_models(out, models, eval_sets)
            write_json(out / "results.json", results)
            write_report(results, out)
    return results


def _eval_set(name: str, data: MultiTaskSplit, seed: int) -> Any:
    """The replicate's test set with the example ids the hash gates read (``moekit analyze``)."""
    from ..analysis.target import multitask_eval_set

    what = f"{name} (test split of replicate {seed}, as the experiment)"
    return multitask_eval_set(data, name, what, route_meta={"example_id": _example_ids(data)["test"]})
