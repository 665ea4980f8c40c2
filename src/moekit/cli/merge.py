"""``moekit merge``: merge a trained MoE's experts (M-SMoE) and save a smaller checkpoint.

    moekit merge CKPT_OR_HF_DIR --experts 4 --method mcsmoe --calib notes.txt --out merged/ [--form exact]

The input is a moekit checkpoint (``config.json`` with ``"format": "moekit"``) or a Hugging Face
model directory of a supported family. The input is only read. The output is built in a temporary
sibling directory and renamed into place when complete, so a failure leaves nothing at ``--out``;
an existing ``--out`` is replaced only with ``--overwrite`` and only if moekit wrote it
(``_options.checked_out``); ``--out`` may not overlap the input. ``merge_report.json`` in the output
records the settings, per-layer expert counts, parameters and file sizes before/after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from torch import nn
from tqdm.auto import tqdm

from ..merging.grouping import GROUPINGS
from ..merging import BUDGETS, FORMS
from ..registry import MERGE_METHODS
from ..reporting import atomic_directory
from . import _calib
from ._options import add_out, out_for_input, at_least, checked_out

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
Merged = tuple[nn.Module, Callable[[Path], Any], dict[str, Any]]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("merge", help="merge a trained MoE's experts (M-SMoE) into a smaller checkpoint")
    p.add_argument("input", help="moekit checkpoint directory or Hugging Face model directory (only read)")
    p.add_argument("--experts", type=at_least(1), required=True,
                   help="experts kept per MoE layer (average if budget global)")
    methods = ", ".join(MERGE_METHODS.names())
    p.add_argument("--method", default="mcsmoe", help=f"one of {methods} (default: %(default)s)")
    p.add_argument(
        "--form", choices=FORMS, default="plain",
        help="plain: standard smaller model, router folded; exact: router unchanged + index map (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--budget", choices=BUDGETS, default=None,
        help="global: per-layer counts from activation frequencies; uniform: --experts in every layer "
        "(default: uniform for plain, global for exact)",
    )  # fmt: skip
    p.add_argument("--exclude", nargs="+", default=[], metavar="LAYER", help="MoE layer names left unmerged (default: none)")
    p.add_argument("--grouping", choices=GROUPINGS, default=None, help="override the method's grouping (default: the method's own)")
    _calib.add_calib_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of random grouping (default: %(default)s)")
    add_out(p, what="the merged checkpoint and merge_report.json", default_help="moekit-runs/merge/<input name>")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(func=_run)


def _read_config(src: Path) -> dict[str, Any]:
    from ..checkpoint import read_config_json

    if src.exists() and not src.is_dir():
        raise ValueError(f"input {str(src)!r} is not a directory (give a moekit checkpoint or Hugging Face model)")
    meta = read_config_json(src, what="input")
    if not isinstance(meta, dict) or (meta.get("format") != "moekit" and "model_type" not in meta):
        raise ValueError(f"{str(src / 'config.json')!r} is neither a moekit checkpoint config nor a Hugging Face model config")
    return meta


def _check_experts(experts: int, counts: dict[str, int], src: Path, exclude: list[str]) -> None:
    unknown = sorted(set(exclude) - set(counts))
    if unknown:
        raise ValueError(f"--exclude names {unknown}, which are not MoE layers of {str(src)!r}; "
                         f"MoE layers: {list(counts)}")
    merged = [c for name, c in counts.items() if name not in set(exclude)] or list(counts.values())
    if not 1 <= experts <= min(merged):
        where = f"experts per MoE layer of {str(src)!r}"
        raise ValueError(f"--experts must be between 1 and {min(merged)} ({where}), got {experts}")


def _weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _merge_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    budget = args.budget or ("uniform" if args.form == "plain" else "global")
    kw: dict[str, Any] = {
        "experts": args.experts, "method": args.method, "form": args.form, "budget": budget,
        "exclude": list(args.exclude), "seed": args.seed,
    }  # fmt: skip
    if args.grouping:
        kw["grouping"] = args.grouping
    return kw


def _merge_moekit(args: argparse.Namespace, src: Path, meta: dict[str, Any]) -> Merged:
    from ..checkpoint import load_checkpoint, write_checkpoint
    from ..merging import merge_moekit_model, moe_layers

    cfg = meta["config"]
    if "vocab_size" not in cfg or "max_seq_len" not in cfg:
        kind = meta.get("model")
        raise ValueError(f"{str(src)!r} holds a {kind!r} model; text calibration needs a moekit language model")
    model = load_checkpoint(src)
    _check_experts(args.experts, {n: m.experts.num_experts for n, m in moe_layers(model).items()}, src, args.exclude)
    batches, calibration = _calib.calibration_batches(args, vocab_size=cfg["vocab_size"], context=cfg["max_seq_len"],
                                                      byte_level=True)  # fmt: skip
    bar = not args.quiet and sys.stderr.isatty()
    batches = tqdm(batches, desc="calibrate", disable=not bar, leave=False)
    before = _params(model)
    merged = merge_moekit_model(model, batches, quiet=args.quiet, **_merge_kwargs(args))
    layers = {
        n: {"experts": m.experts.num_experts, "router_outputs": m.router.num_experts}
        for n, m in moe_layers(merged).items()
    }
    info = {"kind": "moekit", "model": meta.get("model"), "params_before": before, "layers": layers,
            "calibration": {"tokens": calibration["tokens"], "tokenizer": calibration["tokenizer"]}}  # fmt: skip
    return merged, lambda path: write_checkpoint(merged, path), info


def _merge_hf(args: argparse.Namespace, src: Path, meta: dict[str, Any]) -> Merged:
    from ..integrations.hf import MERGE_CONFIG_KEY, family_for, load_hf_model, merge_hf_model
    from ..integrations.hf.checks import quiet_transformers

    family = family_for(SimpleNamespace(model_type=meta["model_type"]))
    if (meta.get(MERGE_CONFIG_KEY) or {}).get("form") == "exact":
        raise ValueError(f"{str(src)!r} is already merged (exact form); merge the original model instead")
    tokenizer = _calib.find_tokenizer(src)
    model = load_hf_model(src)
    blocks = family.blocks(model)
    _check_experts(args.experts, {n: family.num_experts(b) for n, b in blocks.items()}, src, args.exclude)
    batches, calibration = _calib.calibration_batches(
        args, vocab_size=model.config.vocab_size, context=getattr(model.config, "max_position_embeddings", None),
        tokenizer=tokenizer, decoder=bool(getattr(model.config, "is_encoder_decoder", False)),
    )  # fmt: skip
    before = _params(model)
    merged = merge_hf_model(model, batches, inplace=True, quiet=args.quiet, **_merge_kwargs(args))
    layers = {
        n: {"experts": family.num_experts(b), "router_outputs": family.router(b).num_experts}
        for n, b in family.blocks(merged).items()
    }
    info = {"kind": "huggingface", "model": meta["model_type"], "params_before": before, "layers": layers,
            "calibration": {"tokens": calibration["tokens"], "tokenizer": calibration["tokenizer"]}}  # fmt: skip

    def save(path: Path) -> None:
        with quiet_transformers():
            merged.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    return merged, save, info


def _run(args: argparse.Namespace) -> int:
    src, out = Path(args.input), Path(out_for_input(args, "merge"))
    MERGE_METHODS.entry(args.method)
    inputs = [src, *_calib.calib_inputs(args.calib)]
    checked_out(args, inputs=inputs)
    meta = _read_config(src)
    start = time.perf_counter()
    merged, save, info = (_merge_moekit if meta.get("format") == "moekit" else _merge_hf)(args, src, meta)
    with atomic_directory(out, overwrite=args.overwrite, inputs=inputs, name="--out", writer="moekit merge") as stage:
        save(stage)
        report = {
            "input": str(src), "output": str(out), **_merge_kwargs(args),
            "calibration": {"sources": list(args.calib), "samples": args.calib_samples, **info["calibration"]},
            "model": info["model"], "kind": info["kind"], "layers": info["layers"],
            "params_before": info["params_before"], "params_after": _params(merged),
            "weights_bytes_before": _weights_bytes(src), "weights_bytes_after": _weights_bytes(stage),
            "seconds": round(time.perf_counter() - start, 3),
        }  # fmt: skip
        (stage / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        _summary(report)
    return 0


def _summary(r: dict[str, Any]) -> None:
    def change(a: int, b: int) -> str:
        return f"{a:,} -> {b:,} ({100.0 * (b - a) / a:+.1f}%)" if a else f"{a:,} -> {b:,}"

    counts = [layer["experts"] for layer in r["layers"].values()]
    print(f"merged {r['input']} ({r['model']}) -> {r['output']}")
    print(f"  form={r['form']} method={r['method']} budget={r['budget']}: experts per layer {counts}")
    print(f"  parameters {change(r['params_before'], r['params_after'])}")
    print(f"  weight bytes {change(r['weights_bytes_before'], r['weights_bytes_after'])}")
    print(f"  calibration {r['calibration']['tokens']} tokens ({r['calibration']['tokenizer']}), {r['seconds']:.1f} s")
