"""Readable experiment outputs: atomic file writes, JSON with environment, markdown tables, PNG plots."""

from __future__ import annotations

import json
import os
import platform
import sys
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_directory",
    "staging_dir",
    "publish_dir",
    "check_report_dir",
    "report_directory",
    "write_json",
    "environment",
    "markdown_table",
    "save_figure",
    "mean_std",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A new empty directory beside ``target`` (same filesystem, so it can be renamed onto it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    stage.chmod(0o777 & ~_umask())  # mkdtemp makes the directory private; the result is an ordinary directory
    return stage


def _ordinary_permissions(directory: Path) -> None:
    """Give every file below ``directory`` the permissions of a plain ``open()`` (some writers,
    such as safetensors, create private temporary files and rename them)."""
    mode = 0o666 & ~_umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def publish_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Move the finished directory ``staged`` to ``target`` with renames only.

    An existing ``target`` is replaced only when ``overwrite``; it is renamed aside first and removed last.
    """
    staged, target = Path(staged), Path(target)
    _ordinary_permissions(staged)
    if not target.exists():
        os.replace(staged, target)
        return target
    if not overwrite:
        raise FileExistsError(f"output directory {str(target)!r} already exists (pass overwrite=True to replace it)")
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / "previous")
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a staging place and rename it to ``target`` only if the block succeeds.

    Raises ``FileExistsError`` up front when ``target`` exists and not ``overwrite``. On any error the
    staging directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(target)!r} already exists (pass overwrite=True to replace it)")
    stage = staging_dir(target)
    try:
        yield stage
        publish_dir(stage, target, overwrite=overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_report_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as a Path, if a report may be written there: it does not exist, is an empty directory,
    or holds an earlier report (``results.json``). Call it before long work, so a bad ``--out``
    fails at once rather than after the run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {str(out)!r} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise FileExistsError(
            f"output directory {str(out)!r} exists and is not an earlier report (no results.json); choose another --out"
        )
    return out


@contextmanager
def report_directory(out: str | os.PathLike[str]) -> Iterator[Path]:
    """``atomic_directory`` for experiment reports: the whole report appears at ``out`` or nothing
    does; an earlier report there is replaced (anything else is refused by ``check_report_dir``)."""
    with atomic_directory(check_report_dir(out), overwrite=True) as stage:
        yield stage


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors to lists, paths to strings, NaN/inf to null."""
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (atomically); NaN/inf become null."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce a run: versions, platform, threads, device."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, floatfmt: str = ".4g") -> str:
    """A GitHub-markdown table; floats formatted with ``floatfmt``."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if v != v else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` (population std over seeds), for report tables."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std(correction=0)) if t.numel() > 1 else 0.0
    return f"{float(t.mean()):.4g} ± {std:.2g}"


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
