"""``moekit analyze``: routing analysis report of a saved moekit checkpoint or of a run of
``moekit reproduce constraints`` (its ``results.json`` names the checkpoints and the data).

    moekit analyze moekit-runs/constraints --run p4-E4-importance-s0
    moekit analyze my_checkpoint --data digits --image-size 16 --out runs/analysis
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import Tensor

DATA = ("digits", "digits-flat", "domain-digits", "cifar10", "cifar100")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze", help="routing analysis report (utilisation, specialisation, forced experts, k sweep)"
    )
    p.add_argument("path", help="a moekit checkpoint directory, or an experiment run directory with results.json")
    p.add_argument("--run", default=None, help="which run of an experiment directory (see its results.json)")
    p.add_argument("--data", default=None, choices=DATA, help="evaluation data (default: the run's data, else digits)")
    p.add_argument("--data-dir", default=None, help="directory with the CIFAR binary files")
    p.add_argument(
        "--image-size", type=int, default=None, help="digits: upscaled image size (default: the run's, else 32)"
    )
    p.add_argument("--max-images", type=int, default=None, help="analyse only the first N test images")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE plot")
    p.add_argument(
        "--out",
        default=None,
        help="report directory (default: <run dir>/analysis/<run> or moekit-runs/analysis/<name>)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.set_defaults(func=_run)


def _resolve(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Path]:
    """(checkpoint dir, data settings, default output dir) for a checkpoint or an experiment run."""
    path = Path(args.path)
    if (path / "config.json").is_file():
        return path, {}, Path("moekit-runs/analysis") / path.resolve().name
    results = path / "results.json"
    if not results.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is neither a moekit checkpoint (no config.json) nor an experiment run (no results.json)"
        )
    try:
        info = json.loads(results.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt experiment results {str(results)!r}: {err}") from None
    runs = {r["name"]: r for r in info.get("runs", []) if isinstance(r, dict) and r.get("checkpoint")}
    if not runs:
        raise ValueError(f"{str(results)!r} lists no run with a saved checkpoint")
    if args.run is None:
        if len(runs) > 1:
            raise ValueError(f"{str(path)!r} holds {len(runs)} runs; pick one with --run: {', '.join(sorted(runs))}")
        args.run = next(iter(runs))
    if args.run not in runs:
        raise ValueError(f"--run {args.run!r} not found; runs with checkpoints: {', '.join(sorted(runs))}")
    config = info.get("config", {})
    data = {
        "data": config.get("data"),
        "data_dir": config.get("data_dir"),
        "image_size": config.get("image_size"),
        "num_train": config.get("num_train"),
        "num_test": config.get("num_test"),
    }
    return path / runs[args.run]["checkpoint"], data, path / "analysis" / args.run


def _load_data(name: str, args: argparse.Namespace, run: dict[str, Any], channels: int):
    from ..data.cifar import load_cifar_split
    from ..data.digits import load_digits_split
    from ..data.domains import load_domain_digits
    from ..data.images import ImageSplit, load_digit_images

    if name == "digits-flat":
        d = load_digits_split()
        return ImageSplit(
            d.x_train, d.y_train, d.x_test, d.y_test, 10, "digits-flat", class_names=tuple(str(i) for i in range(10))
        )
    if name == "digits":
        data = load_digit_images(size=args.image_size or run.get("image_size") or 32, channels=channels)
    elif name == "domain-digits":
        data = load_domain_digits(size=args.image_size or run.get("image_size") or 16)
    else:
        directory = args.data_dir or run.get("data_dir")
        if not directory:
            raise ValueError(f"--data {name} needs --data-dir (a directory with the CIFAR binary files)")
        data = load_cifar_split(directory, name)
    return data.subset(run.get("num_train"), run.get("num_test"))  # the experiment's split


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import analyze_model, write_analysis_report
    from ..checkpoint import load_checkpoint, read_checkpoint_config

    checkpoint, run, default_out = _resolve(args)
    out = Path(args.out) if args.out else default_out
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    if args.max_images is not None and args.max_images < 5:
        raise ValueError(f"--max-images must be >= 5, got {args.max_images}")
    meta = read_checkpoint_config(checkpoint)
    model = load_checkpoint(checkpoint)
    data = _load_data(args.data or run.get("data") or "digits", args, run, int(meta["config"].get("in_channels", 3)))
    x, y = data.x_test[: args.max_images], data.y_test[: args.max_images]
    # categorical metadata only: a field with a distinct value per image is an identifier
    metadata = {k: v[: args.max_images] for k, v in data.meta_test.items() if v.unique().numel() < v.numel()}
    starts = range(0, len(y), 256)
    batches = [(x[i : i + 256], y[i : i + 256], {k: v[i : i + 256] for k, v in metadata.items()}) for i in starts]

    def logits_of(output: Any) -> Tensor:
        return output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def accuracy(m: torch.nn.Module) -> float:
        m.eval()
        return sum(int((logits_of(m(b[0])).argmax(-1) == b[1]).sum()) for b in batches) / len(y)

    result = analyze_model(
        model,
        batches,
        labels=lambda b: b[1],
        metadata=(lambda b: b[2]) if metadata else None,
        evaluate=accuracy,
        tsne=not args.no_tsne,
        max_tokens=max(len(y), 1),
        num_labels=data.num_classes,
        class_names=data.class_names,
    )
    description = (
        f"Checkpoint `{checkpoint}` ({meta['model']}), evaluated on the {len(y)} test images of {data.name}. "
        "The metric is test accuracy."
    )
    write_analysis_report(
        result,
        out,
        title=f"Routing analysis: {checkpoint.name}",
        description=description,
        config={
            "checkpoint": str(checkpoint),
            "model": meta["model"],
            "model_config": meta["config"],
            "data": data.name,
        },
        overwrite=args.overwrite,
    )
    print(f"report written to {out}/report.md")
    return 0
