"""What a routing analysis runs: a model loaded from any path moekit reads, data that fits it, and how
to run and score it.

* ``load_analysis_model(path)``: a moekit checkpoint (any registered model, with or without routed
  adapters), an expert-parallel checkpoint (loaded on one process) or a Hugging Face MoE directory.
* ``read_runs(path)`` / ``resolve_run(path, run)``: an experiment's output directory, whose
  ``results.json`` lists ``runs`` with a ``name`` and a ``checkpoint`` (relative path) and optionally an
  ``eval_set`` (a file written by ``EvalSet.save``; also accepted once at the top of ``results.json``).
* ``default_eval_set(model)`` / ``builtin_eval_set(name, ...)``: the data that fits a model when the run
  names none -- byte windows of the Python standard library for language models, digit images for CNNs,
  digit vectors for vector classifiers, MultiDigits or the synthetic tasks for multi-task models.
* ``ModelRunner(model, data)``: batches, the forward (routing metadata passed the way the model takes it,
  adapters included), labels/metadata per batch and the evaluation metric.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..reporting import read_json
from .evalset import EvalSet

__all__ = [
    "INPUT_KINDS", "BUILTIN_DATA", "input_kind", "load_analysis_model", "read_runs", "resolve_run", "RunSpec",
    "builtin_eval_set", "default_eval_set", "eval_set_for", "byte_eval_set", "image_eval_set", "multitask_eval_set",
    "ModelRunner",
]  # fmt: skip

INPUT_KINDS = ("tokens", "images", "vectors")
BUILTIN_DATA = ("digits", "digits-flat", "domain-digits", "cifar10", "cifar100", "multidigits", "synthetic", "stdlib")
RESULTS_NAME = "results.json"


def _is_hf(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) is not None and callable(
        getattr(model, "save_pretrained", None)
    )


def input_kind(model: nn.Module) -> str | None:
    """What the model takes: ``"tokens"`` (language models), ``"images"``, ``"vectors"``, or None when unknown."""
    from ..models.classifier import MoEClassifier
    from ..models.lm import MoELM
    from ..models.multitask import MultiGateMoE
    from ..models.resnet_moe import ResNetMoE

    if _is_hf(model) or isinstance(model, MoELM):
        return "tokens"
    if isinstance(model, ResNetMoE):
        return "images"
    if isinstance(model, (MoEClassifier, MultiGateMoE)):
        return "vectors"
    return None


# ----- models and runs
def load_analysis_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The model in ``path`` (eval mode) and what was loaded: ``{"path", "format", "model", "config"}``."""
    from ..checkpoint import checkpoint_format, load_checkpoint, read_config_json

    path = Path(path)
    fmt = checkpoint_format(path)
    meta = read_config_json(path)
    if fmt == "huggingface":
        from ..integrations.hf import load_hf_model

        model = load_hf_model(path)
        return model.eval(), {"path": str(path), "format": fmt, "model": meta["model_type"], "config": None}
    model = load_checkpoint(path)
    info = {"path": str(path), "format": fmt, "model": meta.get("model"), "config": meta.get("config")}
    if (path / "adapters").is_dir():
        info["adapters"] = json.loads((path / "adapters" / "adapters.json").read_text(encoding="utf-8"))["method"]
    return model.eval(), info


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment directory: its checkpoint, its evaluation set (None: pick by model), the
    data settings recorded in ``results.json``'s ``config`` (used when there is no evaluation set) and
    the evaluation batch size (``"eval_batch_size"``, per run or at the top; None: not recorded)."""

    name: str
    checkpoint: Path
    eval_set: Path | None
    data: dict[str, Any]
    batch_size: int | None = None  # the experiment's evaluation batch (batch-dependent routers: expert choice)


def read_runs(path: str | os.PathLike[str]) -> dict[str, RunSpec]:
    """``{run name: RunSpec}`` of the runs with a saved checkpoint in an experiment directory."""
    path = Path(path)
    results = path / RESULTS_NAME
    if not results.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {RESULTS_NAME}: not an experiment output directory")
    info = read_json(results, what="experiment results")
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    data = {k: config.get(k) for k in ("data", "data_dir", "image_size", "num_train", "num_test")}
    shared = info.get("eval_set")
    runs = {}
    for r in info.get("runs", []) if isinstance(info.get("runs"), list) else []:
        if isinstance(r, dict) and r.get("checkpoint") and r.get("name"):
            eval_set = r.get("eval_set") or shared
            batch = r.get("eval_batch_size") or info.get("eval_batch_size")
            runs[str(r["name"])] = RunSpec(str(r["name"]), path / r["checkpoint"], path / eval_set if eval_set else None,
                                           {k: v for k, v in data.items() if v is not None},
                                           int(batch) if isinstance(batch, int) and batch > 0 else None)  # fmt: skip
    if not runs:
        raise ValueError(f"{str(results)!r} lists no run with a saved checkpoint (runs need 'name' and 'checkpoint')")
    return runs


def resolve_run(path: str | os.PathLike[str], run: str | None) -> RunSpec:
    """The run ``run`` of an experiment directory (may be None when it holds exactly one)."""
    runs = read_runs(path)
    if run is None:
        if len(runs) > 1:
            raise ValueError(f"{str(path)!r} holds {len(runs)} runs; pick one with --run: {', '.join(runs)}")
        return next(iter(runs.values()))
    if run not in runs:
        raise ValueError(f"--run {run!r} not found in {str(path)!r}; runs with checkpoints: {', '.join(runs)}")
    return runs[run]


# ----- data
def byte_eval_set(data_N: Tensor, *, seq_len: int, samples: int, name: str, description: str) -> EvalSet:
    """Up to ``samples`` non-overlapping windows of ``seq_len`` byte tokens spread over ``data_N`` (uint8 or
    int64 bytes), as a language-model set."""
    from ..data.stdlib_corpus import eval_windows

    check_int("seq_len", seq_len, low=2)
    windows = eval_windows(data_N.long(), seq_len - 1, check_int("samples", samples, low=1))
    return EvalSet.from_tokens(windows, name=name, description=description)


def _stdlib(seq_len: int, samples: int) -> EvalSet:
    from ..data.stdlib_corpus import load_stdlib_corpus

    corpus = load_stdlib_corpus()
    return byte_eval_set(
        corpus.val, seq_len=seq_len, samples=samples, name="stdlib",
        description=f"{samples} windows of {seq_len} bytes from the validation files of the Python "
        f"{corpus.python} standard library sources (moekit.data.stdlib_corpus)",
    )  # fmt: skip


def image_eval_set(data: Any, what: str, group_names: dict[str, tuple[str, ...]] | None = None) -> EvalSet:
    """The test part of an ``ImageSplit`` as an evaluation set: metadata with repeated values become
    groups (domain), example ids and domains the routing metadata (``example_ids``, ``tag``) the hash,
    tag and adapter routers read."""
    groups = {k: v for k, v in data.meta_test.items() if v.unique().numel() < v.numel()}  # ids are not groups
    route_meta = {"example_ids": data.meta_test["example_id"]} if "example_id" in data.meta_test else {}
    if "domain" in data.meta_test:
        route_meta["tag"] = data.meta_test["domain"]
    return EvalSet(data.x_test, data.y_test, route_meta=route_meta, groups=groups, class_names=data.class_names,
                   group_names=group_names or {}, name=data.name, label_name="class",
                   description=f"the {len(data.y_test)} test images of {what}")  # fmt: skip


def builtin_eval_set(
    name: str,
    *,
    channels: int = 3,
    image_size: int | None = None,
    data_dir: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    in_dim: int | None = None,
    num_tasks: int = 2,
    seq_len: int = 65,
    samples: int = 64,
    seed: int = 0,
) -> EvalSet:
    """A built-in evaluation set by name (``BUILTIN_DATA``), reproducing the test split moekit's
    experiments use (``num_train`` / ``num_test``: the experiment's subset)."""
    check_choice("data", name, BUILTIN_DATA)
    if name == "stdlib":
        return _stdlib(seq_len, samples)
    if name == "digits-flat":
        from ..data.digits import load_digits_split

        d = load_digits_split(seed=seed)
        return EvalSet(d.x_test, d.y_test, route_meta={"token_ids": torch.arange(len(d.y_test)) + len(d.y_train)},
                       class_names=tuple(str(i) for i in range(10)), name="digits-flat", label_name="digit",
                       description=f"the {len(d.y_test)} test digits of scikit-learn (64 standardised pixels)")  # fmt: skip
    if name in ("multidigits", "synthetic"):
        return _multitask_set(name, in_dim=in_dim, num_tasks=num_tasks, seed=seed)
    if name == "digits":
        from ..data.images import load_digit_images

        size = image_size or 32
        data = load_digit_images(size=size, channels=channels, seed=seed).subset(num_train, num_test)
        return image_eval_set(data, f"scikit-learn's digits upscaled to {channels}x{size}x{size}")
    if name == "domain-digits":
        from ..data.domains import DOMAINS, load_domain_digits

        size = image_size or 16
        data = load_domain_digits(size=size, seed=seed).subset(num_train, num_test)
        return image_eval_set(data, f"digits rendered in {len(DOMAINS)} visual domains ({size}x{size}, domain as metadata)",
                          {"domain": tuple(DOMAINS)})
    if not data_dir:
        raise ValueError(f"data {name!r} needs a data directory with the CIFAR binary files (--data-dir)")
    from ..data.cifar import load_cifar_split

    return image_eval_set(load_cifar_split(data_dir, name).subset(num_train, num_test), name.upper())


def _multitask_set(name: str, *, in_dim: int | None, num_tasks: int, seed: int) -> EvalSet:
    if name == "multidigits":
        from ..data.multidigits import make_multidigits

        split = make_multidigits(seed=seed)
        what = "MultiDigits (two overlaid scikit-learn digits, 12x12; tasks: top-left and bottom-right digit)"
    else:
        from ..data.synthetic_multitask import make_synthetic_multitask

        split = make_synthetic_multitask(dim=in_dim or 100, num_tasks=num_tasks, seed=seed)
        what = f"the synthetic regression tasks of Ma et al. (dim {split.num_features}, {num_tasks} tasks)"
    return multitask_eval_set(split, name, what)


def multitask_eval_set(split: Any, name: str, what: str, route_meta: dict[str, Tensor] | None = None) -> EvalSet:
    """The test part of a ``MultiTaskSplit``: every task's targets; the first classification task's
    classes are the labels, the other tasks' classes groups; ``route_meta`` e.g. hash keys ``[N]``."""
    first = next((i for i, spec in enumerate(split.tasks) if spec.kind == "classification"), None)
    labels = None if first is None else split.ys_test[first]
    names = tuple(str(i) for i in range(split.tasks[first].num_outputs)) if first is not None else ()
    groups = {f"{t.name} class": y for i, (t, y) in enumerate(zip(split.tasks, split.ys_test))
              if t.kind == "classification" and i != first}  # fmt: skip
    return EvalSet(split.x_test, labels, tuple(split.ys_test), route_meta=dict(route_meta or {}), groups=groups,
                   class_names=names, name=name,
                   description=f"the {split.x_test.shape[0]} test examples of {what}",
                   label_name="label" if first is None else f"{split.tasks[first].name} class")  # fmt: skip


def eval_set_for(
    model: nn.Module,
    data: EvalSet | str | os.PathLike[str] | None = None,
    *,
    run: RunSpec | None = None,
    **settings: Any,
) -> EvalSet:
    """The data to analyse ``model`` on, in this order: ``data`` (an ``EvalSet``, a file saved with
    ``EvalSet.save`` or a ``BUILTIN_DATA`` name), the run's saved evaluation set, the built-in data its
    ``results.json`` names, else ``default_eval_set(model)``. ``settings`` (``image_size``, ``data_dir``,
    ``num_train``, ``num_test``, ``seq_len``, ``samples``, ``seed``) override the run's recorded ones."""
    if isinstance(data, EvalSet):
        return data
    if data is not None and str(data) not in BUILTIN_DATA:
        if not Path(data).is_file():
            raise FileNotFoundError(f"--data {str(data)!r} is neither a built-in data set ({', '.join(BUILTIN_DATA)}) "
                                    "nor an evaluation set file")  # fmt: skip
        return EvalSet.load(data)
    recorded = dict(run.data) if run is not None else {}
    if data is None and run is not None and run.eval_set is not None:
        return EvalSet.load(run.eval_set)
    name = str(data) if data is not None else recorded.pop("data", None)
    recorded.pop("data", None)
    options = {**recorded, **{k: v for k, v in settings.items() if v is not None}}
    if name is None:
        keep = {k: options[k] for k in ("seq_len", "samples", "seed", "image_size") if k in options}
        return default_eval_set(model, **keep)
    from ..models.resnet_moe import ResNetMoE

    if isinstance(model, ResNetMoE):
        options.setdefault("channels", model.config()["in_channels"])
    return builtin_eval_set(name, **options)


def default_eval_set(
    model: nn.Module, *, seq_len: int = 65, samples: int = 64, image_size: int | None = None, seed: int = 0
) -> EvalSet:
    """The built-in data that fits ``model`` (see the module doc); ValueError naming the options otherwise."""
    from ..models.classifier import MoEClassifier
    from ..models.lm import MoELM
    from ..models.multitask import MultiGateMoE
    from ..models.resnet_moe import ResNetMoE

    if isinstance(model, MoELM):
        return _stdlib(min(seq_len, model.max_seq_len), samples)
    if isinstance(model, ResNetMoE):
        return builtin_eval_set("digits", channels=model.config()["in_channels"], image_size=image_size, seed=seed)
    if isinstance(model, MoEClassifier) and model.embed.in_features == 64:
        return builtin_eval_set("digits-flat", seed=seed)
    if isinstance(model, MultiGateMoE):
        kinds = {t.kind for t in model.tasks}
        if model.in_dim == 144 and kinds == {"classification"} and len(model.tasks) == 2:
            return builtin_eval_set("multidigits", seed=seed)
        if kinds == {"regression"}:
            return builtin_eval_set("synthetic", in_dim=model.in_dim, num_tasks=len(model.tasks), seed=seed)
    kind = input_kind(model)
    hint = "text or token ids (--calib)" if kind == "tokens" else f"one of {', '.join(BUILTIN_DATA)} or an EvalSet file"
    raise ValueError(f"no built-in data fits {type(model).__name__}"
                     f"{f' (it takes {kind})' if kind else ''}: give {hint} with --data")  # fmt: skip


# ----- running and scoring
def _accepts_meta(model: nn.Module) -> bool:
    try:
        return "meta" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find logits in the model output ({type(output).__name__})")


class ModelRunner:
    """Runs ``model`` on ``data`` in batches of ``batch_size`` examples and scores it.

    ``batches`` are index slices; ``forward(model, batch)``, ``labels(batch)`` and ``metadata(batch)``
    are what ``analyze_model`` takes; ``evaluate(model)`` is the metric over the whole set, named by
    ``metric_name`` (``higher_is_better`` says which way is better).
    """

    def __init__(self, model: nn.Module, data: EvalSet, *, batch_size: int = 256) -> None:
        from ..models.multitask import MultiGateMoE

        kind = input_kind(model)
        if kind is not None and kind != data.kind:
            raise ValueError(f"{type(model).__name__} takes {kind} but the data {data.name!r} holds {data.kind}")
        self.model, self.data = model, data
        self.hf = _is_hf(model)
        self.multitask = isinstance(model, MultiGateMoE)
        self.adapters = hasattr(model, "moekit_adapters")
        self.meta_kwarg = not self.hf and _accepts_meta(model)
        self.batches = [slice(i, i + batch_size) for i in range(0, len(data), check_int("batch_size", batch_size, low=1))]
        if self.multitask:
            if len(data.targets) != len(model.tasks):
                raise ValueError(f"{type(model).__name__} has {len(model.tasks)} tasks but the data has "
                                 f"{len(data.targets)} targets")  # fmt: skip
            regression = all(t.kind == "regression" for t in model.tasks)
            self.metric_name, self.higher_is_better = ("mean task MSE", False) if regression else ("mean task accuracy", True)
        elif data.kind == "tokens":
            byte_level = getattr(getattr(model, "config", None), "model_type", None) is None
            self.metric_name, self.higher_is_better = ("bits per byte" if byte_level else "bits per token"), False
        else:
            if data.labels is None:
                raise ValueError(f"data {data.name!r} has no labels to measure accuracy on")
            self.metric_name, self.higher_is_better = "accuracy", True

    def forward(self, model: nn.Module, batch: slice) -> Any:
        x = self.data.inputs[batch]
        if self.hf:
            from ..integrations.hf import family_for

            return family_for(model).forward_tokens(model, x)
        meta = {k: v[batch] for k, v in self.data.route_meta.items()} or None
        kwargs = {"meta": meta} if self.meta_kwarg and meta else {}
        if self.adapters:
            from ..layers.adapters import adapter_context

            with adapter_context(model, meta=meta):
                return model(x, **kwargs)
        return model(x, **kwargs)

    def labels(self, batch: slice) -> Tensor | None:
        return None if self.data.labels is None else self.data.labels[batch]

    def metadata(self, batch: slice) -> dict[str, Tensor]:
        return {k: v[batch] for k, v in self.data.groups.items()}

    def _score(self, model: nn.Module, batch: slice, output: Any) -> tuple[float, float]:
        """(sum of the metric over the batch's units, number of units)."""
        if self.multitask:
            n = float(self.data.inputs[batch].shape[0])
            metrics = model.task_metrics(output, [t[batch] for t in self.data.targets])
            return n * sum(metrics) / len(metrics), n
        if self.data.kind == "tokens":
            loss = getattr(output, "loss", None)
            ids = self.data.inputs[batch]
            if self.hf and loss is not None:  # encoder-decoder: the model's own loss over the decoder tokens
                return float(loss) * ids.numel() / math.log(2), float(ids.numel())
            logits = _logits(output)[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
            return float(nll) / math.log(2), float(ids[:, 1:].numel())
        pred = _logits(output).argmax(-1)
        labels = self.data.labels[batch]
        return float((pred == labels).sum()), float(labels.numel())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            total = count = 0.0
            for batch in self.batches:
                s, n = self._score(model, batch, self.forward(model, batch))
                total, count = total + s, count + n
        finally:
            model.train(was_training)
        return total / count

    def describe(self) -> str:
        return self.data.description or f"{self.data.name} ({len(self.data)} examples)"
