"""``moekit compress``: merge, prune and low-rank-compress a MoE checkpoint, streamed layer by layer.

    moekit compress MODEL_DIR --method m-smoe --experts 4 --max-memory 2GB --out small/
    moekit compress MODEL_DIR --experts 4 --rank 32 --recover-steps 50 --calib notes.txt --out small/
    moekit compress MODEL_DIR --experts 4 --resume --out small/      # continue a killed run

The input (a Hugging Face model directory of a supported family, or a moekit checkpoint) is read one
decoder layer at a time (``moekit.merging.streaming``), so a checkpoint larger than memory compresses
within ``--max-memory``. Each layer's statistics are taken on the outputs of the already compressed
layers before it (``--propagate compressed``, GPTQ-style) or on the original model's
(``--propagate original``, as M-SMoE and REAP do). ``--rank`` adds MC-SMoE's low-rank + sparse step
to every block not excluded (with ``--recover-steps``: layer-wise output matching against the
original block). The output appears at ``--out`` only when complete and checked (its tensors,
shapes and logits on a few calibration tokens, reloaded); ``compress_report.json`` records the run.
Options of the chosen ``--method`` come from its registry entry (see ``moekit.cli._methods``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import _calib
from ._methods import add_method_options, method_options
from ._help import command_summary
from ._options import add_out, add_quiet, at_least, checked_out, experts_count, out_for_input, positive_float

SUMMARY = command_summary(__doc__ or "")  # what moekit --help lists

DESCRIPTION = """Merge, prune and low-rank-compress a MoE checkpoint, streamed one decoder layer at a time
within --max-memory; resumable (--resume), the output appears only when complete and checked.

    moekit compress MODEL_DIR --method m-smoe --experts 4 --max-memory 2GB --out small/
    moekit compress MODEL_DIR --experts 4 --rank 32 --recover-steps 50 --calib notes.txt --out small/
    moekit compress MODEL_DIR --experts 4 --resume --out small/
"""


def _size(text: str) -> int:
    from ..merging.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def register(subparsers: Any) -> None:
    from ..merging import BUDGETS, FORMS
    from ..merging.pipeline import PROPAGATIONS
    from ..registry import EXPERT_METHODS

    p = subparsers.add_parser(
        "compress", help=SUMMARY,
        description=DESCRIPTION,
    )  # fmt: skip
    p.add_argument("input", help="Hugging Face model directory or moekit checkpoint (only read)")
    p.add_argument("--method", default="m-smoe", help=f"expert-reduction method: {', '.join(EXPERT_METHODS.names())}")
    p.add_argument("--experts", type=experts_count, default=None,
                   help="experts kept per MoE block (the average with --budget global), or the fraction kept, e.g. "
                   "0.5 (REAP's rounding: E - int(E * 0.5) per block); default: every expert (then only --rank "
                   "compresses)")  # fmt: skip
    p.add_argument("--protect-super-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="never prune or merge super experts (the Super Experts paper's rule; every method but "
                   "m-smoe; the report lists them)")  # fmt: skip
    p.add_argument("--budget", choices=BUDGETS, default=None,
                   help="global: MC-SMoE's adaptive per-block counts from the method's scores (activation frequency); "
                   "uniform: --experts in every block (default: global for --form exact, uniform for plain)")  # fmt: skip
    p.add_argument("--form", choices=FORMS, default="exact",
                   help="exact: router unchanged + index map (moekit.load_hf_model; --method mone needs it: "
                   "novices answer for the pruned experts); plain: standard smaller model, router folded (stock "
                   "from_pretrained when not --rank)")  # fmt: skip
    p.add_argument("--pad", action="store_true",
                   help="--form plain with different counts per block: pad every block to the largest count with "
                   "experts the router never chooses (costs their zero tensors on disk; needs a router or selection "
                   "bias); without it such a request is refused")  # fmt: skip
    p.add_argument("--exclude", nargs="+", default=[], metavar="BLOCK",
                   help="MoE block names left as they are (e.g. model.layers.0.mlp; default: none)")  # fmt: skip
    p.add_argument("--propagate", choices=PROPAGATIONS, default="compressed",
                   help="statistics of layer i+1 on the outputs of the compressed layer i (compressed) or of the "
                   "original model (original)")  # fmt: skip
    low = p.add_argument_group("low-rank + sparse step (MC-SMoE's C)")
    low.add_argument("--rank", type=at_least(1), default=None,
                     help="rank of each expert matrix's U V factors (default: no low-rank step)")  # fmt: skip
    low.add_argument("--keep-residual", type=_fraction, default=0.1,
                     help="fraction of the sparse residual's entries kept, as whole rows (paper: 0.1)")  # fmt: skip
    low.add_argument("--recover-steps", type=at_least(0), default=0,
                     help="layer-wise recovery steps: each compressed block matches the original block's outputs "
                     "on its calibration inputs (0: residual rows pruned by magnitude)")  # fmt: skip
    low.add_argument("--recover-lr", type=positive_float, default=1e-4, help="Adam learning rate of the recovery")
    p.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="bound on the process's resident memory, e.g. 2GB: a plan from measurements, checked "
                   "before the run and before every layer (default: half of the memory the kernel reports "
                   "available)")  # fmt: skip
    _calib.add_calib_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command (bit-identical result)")  # fmt: skip
    add_out(p, what="the compressed checkpoint and compress_report.json", default_help="moekit-runs/compress/<input name>")
    add_quiet(p)
    add_method_options(p)
    p.set_defaults(func=_run)


def _spec(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    from ..merging.lowrank import LowRankOptions
    from ..merging.pipeline import CompressionSpec

    lowrank = None
    if args.rank is not None:
        lowrank = LowRankOptions(rank=args.rank, keep_residual=args.keep_residual, recover_steps=args.recover_steps,
                                 recover_lr=args.recover_lr)  # fmt: skip
    elif args.recover_steps:
        raise ValueError("--recover-steps trains the low-rank + sparse experts; give --rank too")
    budget = args.budget or ("uniform" if args.form == "plain" else "global")
    return CompressionSpec(
        method=args.method, method_options=options, experts=args.experts, budget=budget, form=args.form,
        exclude=tuple(args.exclude), pad=args.pad, propagate=args.propagate, lowrank=lowrank,
        protect_super_experts=args.protect_super_experts,
    )  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from ..merging.inputs import checkpoint_info
    from ..merging.methods import create_method
    from ..merging.streaming import compress_checkpoint
    from ..registry import EXPERT_METHODS

    src = Path(args.input)
    out_for_input(args, "compress")
    EXPERT_METHODS.entry(args.method)
    options = method_options(args, args.method)
    create_method(args.method, **options)  # a bad option value fails now, before any work
    checked_out(args, inputs=[src, *_calib.calib_inputs(args.calib)])
    info = checkpoint_info(src)
    unknown = sorted(set(args.exclude) - set(info.counts))
    if unknown:
        raise ValueError(f"--exclude names {unknown}, which are not MoE blocks of {str(src)!r}; MoE blocks: {list(info.counts)}")
    reduced = [c for n, c in info.counts.items() if n not in set(args.exclude)]
    if args.experts is None and args.rank is None:
        raise ValueError("give --experts N (merge/prune to N experts per block) and/or --rank R (low-rank + sparse)")
    if isinstance(args.experts, int) and reduced and args.experts > min(reduced):
        raise ValueError(f"--experts must be between 1 and {min(reduced)} (experts per MoE block of {str(src)!r}), got {args.experts}")
    if args.rank is None and (not reduced or args.experts == max(reduced) == min(reduced)):
        print(f"nothing would be merged: {str(src)!r} has {args.experts} experts in every MoE block "
              f"(give a smaller --experts, or --rank for the low-rank step); nothing written")  # fmt: skip
        return 0
    spec = _spec(args, options)
    batches, calibration = _calib.calibration_batches(
        args, vocab_size=info.vocab, context=info.context, tokenizer=info.tokenizer, decoder=info.decoder,
        byte_level=info.kind == "moekit",
    )  # fmt: skip
    settings = {"calibration_sources": calibration}
    report = compress_checkpoint(src, args.out, batches, spec, max_memory=args.max_memory, resume=args.resume,
                                 overwrite=args.overwrite, quiet=args.quiet, settings=settings)  # fmt: skip
    if args.quiet:
        print(args.out)
    else:
        _summary(report)
    return 0


def _summary(r: dict[str, Any]) -> None:
    from ..merging.memory import format_size

    before, after = r["weights_bytes_before"], r["weights_bytes_after"]
    counts = list(r["experts_per_block"].values())
    low = r.get("lowrank")
    print(f"compressed {r['input']} -> {r['output']} ({r['kind']}, form={r['form']}, method={r['method']}, "
          f"budget={r['budget']}{', rank ' + str(low['rank']) if low else ''})")  # fmt: skip
    print(f"  experts per block {counts}")
    protected = {k: v for k, v in (r.get("protected_super_experts") or {}).items() if v}
    if protected:
        print("  protected super experts: " + ", ".join(f"{k} {v}" for k, v in protected.items()))
    if r.get("padding_bytes"):
        print(f"  padding: {format_size(r['padding_bytes'])} of never-routed experts (--pad)")
    print(f"  weight bytes {format_size(before)} -> {format_size(after)} ({100.0 * (after - before) / max(before, 1):+.1f}%)")
    mem = r["memory"]
    print(f"  peak resident memory {format_size(mem['peak_rss'])} (budget {format_size(mem['max_memory'])}), "
          f"{r['seconds']:.1f} s{', resumed' if r['resumed'] else ''}; checked: logits differ by "
          f"{r['verification']['max_abs_logit_diff']:.2g}")  # fmt: skip
