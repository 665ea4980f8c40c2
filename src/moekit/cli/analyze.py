"""``moekit analyze``: routing analysis report (markdown + PNG + JSON) of anything moekit saves or reads.

    moekit analyze CHECKPOINT                           # moekit checkpoint (any model, adapters included)
    moekit analyze EP_CHECKPOINT                        # expert-parallel checkpoint, on one process
    moekit analyze HF_DIR --calib notes.txt             # Hugging Face MoE directory, on your text
    moekit analyze moekit-runs/constraints --run p4-E4-importance-s0   # one run of an experiment
    moekit analyze moekit-runs/constraints --list-runs

The data is chosen to fit the model and named in the report: the run's saved evaluation set, else
byte windows of the Python standard library for language models, digit images for CNNs, digit
vectors for vector classifiers, MultiDigits / the synthetic tasks for multi-task models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ._options import add_out, checked_out
from ._help import command_summary

DEFAULT_ROOT = Path("moekit-runs/analyze")
SUMMARY = command_summary(__doc__ or "")  # what moekit --help lists


def register(subparsers: Any) -> None:
    from ..analysis.target import BUILTIN_DATA

    p = subparsers.add_parser(
        "analyze",
        help=SUMMARY,
        description=(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument("path", help="a moekit checkpoint, an expert-parallel checkpoint, a Hugging Face MoE directory, "
                   "or the output directory of moekit demo / moekit reproduce ...")
    p.add_argument("--run", default=None, metavar="NAME", help="which run of an experiment directory (default: its only run)")
    p.add_argument("--list-runs", action="store_true", help="list the runs of an experiment directory and exit")
    p.add_argument("--data", default=None, metavar="NAME|FILE",
                   help=f"evaluation data: one of {', '.join(BUILTIN_DATA)}, or a file saved with "
                   "moekit.analysis.EvalSet.save (default: the run's data, else the data that fits the model)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="directory with the CIFAR binary files (default: none)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="image side for digits data (default: the run's, else 32 for digits, 16 for domain-digits)")
    p.add_argument("--calib", nargs="+", default=None, metavar="TEXT",
                   help="language models: text files, 'stdlib', or token-id files (.json lists or .safetensors "
                   "with input_ids [N, S]) (default: the validation part of the Python standard library sources)")
    p.add_argument("--calib-samples", type=int, default=64, metavar="N", help="language models: text windows (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=65, metavar="N",
                   help="language models: tokens per window, capped at the model's context (default: %(default)s)")
    p.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="analyse N examples spread evenly over the data (windows for language models) (default: all)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="examples per forward pass (default: the run's evaluation batch when recorded, else 256; "
                   "expert-choice routing depends on it)")
    p.add_argument("--tsne", action=argparse.BooleanOptionalAction, default=False,
                   help="t-SNE plots of the gate logits, coloured by label (slow: tens of seconds per layer on "
                   "2 cores) (default: off)")
    p.add_argument("--no-interventions", action="store_true",
                   help="skip the inference-k sweep and the forced-expert evaluations")
    add_out(p, what="report.md, analysis.json and PNGs",
            default_help=f"{DEFAULT_ROOT}/<checkpoint name> or <run dir>-<run>")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_run)


def _checks(args: argparse.Namespace) -> None:
    for name in ("image_size", "max_examples", "batch_size", "calib_samples", "seq_len"):
        value = getattr(args, name)
        low = {"seq_len": 2, "image_size": 8}.get(name, 1)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _read_token_ids(path: Path) -> Any:
    """Token ids ``[N, S]`` from a ``.json`` list of lists or a ``.safetensors`` file with ``input_ids``."""
    import torch

    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            S = min(len(r) for r in rows)
            return torch.tensor([r[:S] for r in rows], dtype=torch.long)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"--calib {str(path)!r} must be a JSON list of token-id lists: {err}") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path)).get("input_ids")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"--calib {str(path)!r} is not a readable safetensors file: {err}") from None
    if ids is None or ids.dim() != 2:
        raise ValueError(f"--calib {str(path)!r} needs a tensor 'input_ids' of shape [N, S]")
    return ids.long()


def _token_data(model: Any, args: argparse.Namespace, path: Path) -> Any:
    """The language-model evaluation set of ``--calib`` (or the stdlib validation text for HF models)."""
    from ..analysis import EvalSet
    from . import _calib

    hf = getattr(getattr(model, "config", None), "model_type", None) is not None
    vocab = model.config.vocab_size if hf else model.config()["vocab_size"]
    context = (getattr(model.config, "max_position_embeddings", None) if hf else model.max_seq_len) or args.seq_len
    seq_len = min(args.seq_len, context)
    tokenizer = _calib.find_tokenizer(path) if hf else None
    sources = args.calib or []
    id_files = [Path(s) for s in sources if Path(s).suffix in (".json", ".safetensors")]
    if id_files:
        if len(id_files) != len(sources):
            raise ValueError("--calib takes either text (files or 'stdlib') or token-id files, not both")
        import torch

        ids = torch.cat([_read_token_ids(f)[:, :seq_len] for f in id_files])
        what = f"token ids from {', '.join(map(str, id_files))}"
    else:
        if sources:
            text, what = _calib.read_calibration_bytes(sources), f"text from {', '.join(sources)}"
        else:
            from ..data.stdlib_corpus import load_stdlib_corpus

            text, what = bytes(load_stdlib_corpus().val.numpy()), "the validation files of the Python standard library"
        if tokenizer is not None:
            ids = _calib.token_windows(text, tokenizer, samples=args.calib_samples, seq_len=seq_len)
        else:
            ids = _calib.byte_windows(text, samples=args.calib_samples, seq_len=seq_len, vocab_size=vocab)
    if int(ids.max()) >= vocab:
        raise ValueError(f"token ids go up to {int(ids.max())} but the model's vocabulary has {vocab} entries")
    tokens = "its tokenizer" if tokenizer is not None else ("bytes" if not hf else f"bytes % {vocab} (no tokenizer saved)")
    text_of = (lambda i: tokenizer.decode([i])) if tokenizer is not None else None
    return EvalSet.from_tokens(ids, token_text=text_of, name="calibration text" if sources else "stdlib",
                               description=f"{ids.shape[0]} windows of {ids.shape[1]} tokens ({tokens}) of {what}")  # fmt: skip


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    start = time.perf_counter()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def _list_runs(path: Path) -> int:
    from ..analysis import read_runs

    for name, spec in read_runs(path).items():
        data = "saved evaluation set" if spec.eval_set else (spec.data.get("data") or "data that fits the model")
        print(f"{name}\t{spec.checkpoint}\t({data})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..analysis import ModelRunner, analyze_model, eval_set_for, input_kind, load_analysis_model, resolve_run
    from ..analysis import write_analysis_report

    _checks(args)
    path = Path(args.path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory (give a checkpoint, a model or an experiment run)")
    if args.list_runs:
        return _list_runs(path)
    log = _log(args)
    run = None if (path / "config.json").is_file() else resolve_run(path, args.run)
    checkpoint = path if run is None else run.checkpoint
    default_out = DEFAULT_ROOT / (checkpoint.resolve().name if run is None else f"{path.resolve().name}-{run.name}")
    inputs = [i for i in (path, checkpoint, args.data_dir, args.data, *(args.calib or [])) if i is not None]
    out = checked_out(args, inputs=inputs, out=args.out or default_out)
    model, info = load_analysis_model(checkpoint)
    log(f"loaded {checkpoint} ({info['format']}: {info['model'] or type(model).__name__})")
    if input_kind(model) == "tokens" and args.data is None and (args.calib or info["format"] == "huggingface"):
        data = _token_data(model, args, checkpoint)
    elif args.calib:
        raise ValueError(f"--calib is for language models; {type(model).__name__} takes {input_kind(model) or 'other'} "
                         "inputs (use --data)")  # fmt: skip
    else:
        data = eval_set_for(model, args.data, run=run, image_size=args.image_size, data_dir=args.data_dir,
                            seq_len=args.seq_len, samples=args.calib_samples)  # fmt: skip
    if args.max_examples is not None:
        data = data.spread(args.max_examples)
    batch_size = args.batch_size or (run.batch_size if run is not None else None) or 256
    runner = ModelRunner(model, data, batch_size=batch_size)
    log(f"data: {runner.describe()}; metric: {runner.metric_name}")
    tokens = data.inputs.numel() if data.kind == "tokens" else len(data)
    result = analyze_model(
        model, runner.batches, forward=runner.forward, labels=runner.labels,
        metadata=runner.metadata if data.groups else None,
        evaluate=runner.evaluate, forced=not args.no_interventions, ks=[] if args.no_interventions else None,
        tsne=args.tsne, max_tokens=min(max(tokens, 1), 20_000), num_labels=len(data.class_names) or None,
        class_names=data.class_names, group_names=data.group_names, label_name=data.label_name,
        metric_name=runner.metric_name,
        higher_is_better=runner.higher_is_better,
    )  # fmt: skip
    log(f"analysed {len(result.layers)} routed layers")
    model_name = info["model"] or type(model).__name__
    extra = f" with routed adapters ({info['adapters']})" if info.get("adapters") else ""
    description = f"Model: `{checkpoint}` ({model_name}{extra}). Data: {runner.describe()}."
    if run is not None:
        description = f"Run `{run.name}` of `{path}`. " + description
    config = {"path": str(path), "run": None if run is None else run.name, "checkpoint": str(checkpoint),
              "format": info["format"], "model": info["model"], "model_config": info["config"], "data": data.name,
              "data_description": data.description, "examples": len(data), "command": sys.argv}  # fmt: skip
    write_analysis_report(result, out, title=f"Routing analysis: {run.name if run else checkpoint.name}",
                          description=description, config=config, overwrite=args.overwrite,
                          inputs=inputs, name="--out")  # fmt: skip
    if not args.quiet:
        print(f"report written to {out}/report.md")
    return 0
