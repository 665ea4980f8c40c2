"""``moekit eval``: evaluate a (compressed) MoE language model on held-out text.

    moekit eval merged/ --reference original/ --out moekit-runs/eval/merged
    moekit eval my-hf-model/ --data corpus.jsonl --tasks perplexity,generate
    moekit eval merged/ --compare moekit-runs/eval/other   # paired against an earlier run

MODEL is a moekit checkpoint or a Hugging Face model directory (only read). ``results.json``,
``items.jsonl`` and ``report.md`` are written to ``--out`` (default ``moekit-runs/eval/<name of MODEL>``;
absent or empty, or with ``--overwrite`` an earlier output of moekit; checked before any work, and never
one of the inputs), and the report is printed with the path it was written to.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ._help import command_summary
from ._options import add_out, at_least, checked_out, default_out, device_name

SUMMARY = command_summary(__doc__ or "")  # what moekit --help lists


def register(subparsers: Any) -> None:
    from ..evaluation.documents import STDLIB
    from ..evaluation.harness import TASKS, EvalSettings

    d = EvalSettings()
    p = subparsers.add_parser("eval", help=SUMMARY)
    p.add_argument("model", help="moekit checkpoint or Hugging Face model directory (only read)")
    p.add_argument("--data", nargs="+", default=[STDLIB], metavar="SOURCE",
                   help="'stdlib' (held-out stdlib files, default) or text / .jsonl / .safetensors token-id files")  # fmt: skip
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)}, or 'none' (default: all)")  # fmt: skip
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="the original (uncompressed) model: generation is compared with it, and it is evaluated too "
                   "(default: none)")  # fmt: skip
    p.add_argument("--compare", nargs="+", default=[], metavar="RESULTS",
                   help="earlier results.json of moekit eval (or their directories) to compare with, paired on the "
                   "same items (default: none)")  # fmt: skip
    add_out(p, what="results.json, items.jsonl and report.md", default_help=f"{default_out('eval')}/<name of MODEL>")
    p.add_argument("--seed", type=int, default=d.seed, help="item, prompt and bootstrap seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", type=device_name, default="cpu", help="device to run the models on (default: %(default)s)")
    p.add_argument("--cpu-kernels", action="store_true",
                   help="run the models on moekit's CPU inference kernels: transformers experts on moekit's, "
                   "nn.Linear layers through linears_for_inference, weights on huge pages where the kernel has "
                   "them (decode 1.5-2.4x faster on an AMD EPYC; bf16 scores move by rounding; recorded per model)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars, no printed report")
    g = p.add_argument_group("sizes")
    g.add_argument("--documents", type=int, default=None, help="use only the first N documents (default: all)")
    g.add_argument("--max-doc-bytes", type=int, default=None, help="perplexity: score at most N bytes per document (default: all)")
    g.add_argument("--stride", type=int, default=None, help="perplexity window stride in tokens (default: the context)")
    g.add_argument("--context", type=int, default=None, help="tokens per forward (default: the model's, at most 2048)")
    g.add_argument("--items", type=int, default=d.items, help="items per choice/cloze task (default: %(default)s)")
    g.add_argument("--distractors", type=int, default=d.distractors, help="wrong choices per item (default: %(default)s)")
    g.add_argument("--prompts", type=int, default=d.prompts, help="generation prompts (default: %(default)s)")
    g.add_argument("--prompt-length", type=int, default=d.prompt_length,
                   help="bytes of text per prompt (tokens for token-id data) (default: %(default)s)")  # fmt: skip
    g.add_argument("--new-tokens", type=int, default=d.new_tokens, help="greedy tokens per prompt (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per forward (default: %(default)s)")
    g.add_argument("--stdlib-bytes", type=at_least(1024), default=4_000_000,
                   help="size of the stdlib corpus whose validation files are evaluated (default: %(default)s, "
                   "the experiments' corpus)")  # fmt: skip
    lm = p.add_argument_group("lm-eval pass-through (needs the lm-eval package; offline)")
    lm.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-eval task names (default: no lm-eval pass)")
    lm.add_argument("--lm-eval-include", default=None, metavar="DIR", help="directory of local lm-eval task YAMLs (default: lm-eval's own)")
    lm.add_argument("--lm-eval-limit", type=int, default=None, help="lm-eval: at most N examples per task (default: all)")
    p.set_defaults(func=_run)


def _tasks(spec: str) -> list[str]:
    if spec.strip() == "none":
        return []
    return [t.strip() for t in spec.split(",") if t.strip()]


def _eval_tasks(spec: str) -> list[str]:
    """The ``--tasks`` list, every entry checked before any work."""
    from ..evaluation.harness import TASKS

    tasks = _tasks(spec)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"--tasks entry {task!r} is not a task; allowed: {', '.join(TASKS)}, or 'none' alone")
    return tasks


def _earlier(path: str) -> dict[str, Any]:
    """The ``--compare`` results, or an error naming the option."""
    from ..evaluation import load_results

    try:
        return load_results(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--compare: {err}") from None


#: settings that do not change what is measured (an earlier run may differ in them)
FREE_SETTINGS = ("batch_size", "level", "n_resamples")


def _check_comparable(path: str, other: dict[str, Any], digest: str, settings: dict[str, Any]) -> None:
    """Refuse, before any work, an earlier run that evaluated other data or other items."""
    if other.get("data", {}).get("sha256") != digest:
        raise ValueError(f"--compare {path!r} evaluated other data (data sha256 differs); "
                         "use the same --data, --documents and --stdlib-bytes")  # fmt: skip
    theirs = other.get("settings", {})
    differ = [k for k, v in settings.items() if k not in FREE_SETTINGS and theirs.get(k) != v]
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} there, {settings[k]!r} here" for k in differ)
        raise ValueError(f"--compare {path!r} used other settings ({shown})")


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation import EvalSettings, compare_runs, evaluate, load_data, load_model
    from ..evaluation.lm_eval_bridge import check_lm_eval, run_lm_eval
    from ..evaluation.report import markdown_report, write_report

    tasks = _eval_tasks(args.tasks)
    lm_tasks = _tasks(args.lm_eval) if args.lm_eval is not None else []
    if not tasks and not lm_tasks:
        raise ValueError("nothing to do: --tasks is 'none' and no --lm-eval tasks were given")
    settings = EvalSettings(
        seed=args.seed, documents=args.documents, max_doc_bytes=args.max_doc_bytes, stride=args.stride,
        items=args.items, distractors=args.distractors, prompts=args.prompts, prompt_length=args.prompt_length,
        new_tokens=args.new_tokens, batch_size=args.batch_size,
    )  # fmt: skip
    if args.cpu_kernels and args.device != "cpu":
        raise ValueError(f"--cpu-kernels runs the models on the CPU's kernels; got --device {args.device}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    inputs = [args.model, args.reference, *args.data, *args.compare, args.lm_eval_include]
    if args.out is None:
        args.out = default_out("eval", Path(args.model).resolve().name)
    checked_out(args, inputs=inputs)
    if args.lm_eval is not None:
        check_lm_eval(lm_tasks, args.lm_eval_include)
    earlier = [_earlier(path) for path in args.compare]
    try:
        data = load_data(args.data, max_bytes=args.stdlib_bytes).head(settings.documents)
    except FileNotFoundError as err:
        raise ValueError(f"--data: {err}") from None
    for path, other in zip(args.compare, earlier):
        _check_comparable(path, other, data.digest, asdict(settings))
    show = not args.quiet and sys.stderr.isatty()
    loading = {"device": args.device, "context": args.context, "progress": show, "cpu_kernels": args.cpu_kernels}
    model = load_model(args.model, **loading)
    reference = load_model(args.reference, **loading) if args.reference else None
    from_shell = sys.argv and Path(sys.argv[0]).name in ("moekit", "__main__.py")
    result = evaluate(model, data, tasks=tasks, reference=reference, settings=settings, progress=not args.quiet,
                      command=["moekit", *sys.argv[1:]] if from_shell else None)  # fmt: skip
    result["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
    result["not_compared"] = []
    for other in earlier:
        base = dict(other["runs"][0])
        if base["name"] == result["runs"][0]["name"]:
            base["name"] += " (earlier run)"
        result["comparisons"] += compare_runs(result["runs"][0], base, skipped=result["not_compared"],
                                              **settings.stats())  # fmt: skip
    if lm_tasks:
        result["lm_eval"] = run_lm_eval(model, lm_tasks, args.lm_eval_include, batch_size=args.batch_size,
                                        limit=args.lm_eval_limit)  # fmt: skip
    write_report(result, args.out, overwrite=args.overwrite, inputs=[i for i in inputs if i], name="--out")
    if not args.quiet:
        print(markdown_report(result), end="")
        print(f"wrote {Path(args.out) / 'results.json'}, items.jsonl and report.md")
    return 0
