"""Readable experiment outputs: atomic file writes, JSON with environment, markdown tables, PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_directory",
    "staging_dir",
    "as_staging",
    "publish_dir",
    "check_output_dir",
    "check_no_overlap",
    "check_writable_parent",
    "check_replaceable",
    "read_marker",
    "remove_stale_staging",
    "MARKER_NAME",
    "write_json",
    "read_json",
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


#: the marker file of every directory moekit writes (see ``atomic_directory``)
MARKER_NAME = ".moekit-output.json"
MARKER_FORMAT = "moekit-output"
#: a staging directory without a marker (killed between its creation and the marker) older than this is debris
_UNMARKED_STAGE_AGE_S = 60.0
#: staging, set-aside and probe directories are named ``.<name>.<pid>-<random>.tmp|.old``: the pid of their writer
_STAGE_NAME = re.compile(r"\.(\d+)-[A-Za-z0-9_]+\.(?:tmp|old)$")


def _overwrite_hint(name: str) -> str:
    return "--overwrite" if name.startswith("--") else "overwrite=True"


def check_no_overlap(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *, name: str = "directory"
) -> None:
    """Raise ``ValueError`` when the output ``out`` is, contains or lies inside any of ``inputs``
    (files or directories; symbolic links resolved), so that writing or replacing ``out`` can never
    touch an input. Inputs that do not exist (e.g. the word ``stdlib``) cannot be touched and are skipped."""
    target = Path(out).resolve()
    for item in inputs:
        if not os.path.lexists(item):
            continue
        source = Path(item).resolve()
        relation = (
            "is" if source == target
            else "contains" if target in source.parents
            else "lies inside" if source in target.parents
            else None
        )  # fmt: skip
        if relation:
            raise ValueError(
                f"{name} {str(out)!r} {relation} the input {str(item)!r}; moekit never writes over its inputs: "
                "choose a directory outside it"
            )


def check_writable_parent(out: str | os.PathLike[str], *, name: str = "directory") -> None:
    """Raise ``OSError`` naming ``name`` unless ``out`` can be created: its nearest existing ancestor
    must be a directory in which moekit can create (and remove) an entry. Nothing is left behind."""
    out = Path(out)
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{name} {str(out)!r} cannot be created: {str(ancestor)!r} is not a directory")
    try:  # named like a staging directory, so that a run killed before the rmdir leaves debris the next run removes
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=f".moekit-probe.{os.getpid()}-", suffix=".tmp"))
    except OSError as err:
        raise PermissionError(
            f"{name} {str(out)!r} cannot be written: {str(ancestor)!r} is not writable ({err.strerror or err})"
        ) from None


def read_marker(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed marker of a directory moekit wrote, or None (no marker, or not a valid one)."""
    try:
        marker = json.loads((Path(directory) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _foreign_files(directory: Path) -> list[str]:
    """Files below ``directory`` that no moekit marker in the tree lists (nested moekit outputs, such
    as checkpoints inside a report, list their own files)."""
    covered: set[Path] = set()
    for marker_path in directory.rglob(MARKER_NAME):
        marker = read_marker(marker_path.parent)
        if marker is not None:
            covered.add(marker_path)
            covered.update(marker_path.parent / f for f in marker.get("files", []) if isinstance(f, str))
    files = (p for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(p.relative_to(directory).as_posix() for p in files if p not in covered)


def check_replaceable(out: str | os.PathLike[str], *, name: str = "directory") -> None:
    """Raise ``FileExistsError`` unless the existing directory ``out`` may be replaced: moekit wrote
    it (it carries the marker) and it holds no file that moekit did not write."""
    out = Path(out)
    if read_marker(out) is None:
        raise FileExistsError(
            f"{name} {str(out)!r} was not written by moekit (it has no {MARKER_NAME}); moekit replaces only "
            f"its own outputs: choose another {name} or remove it yourself"
        )
    foreign = _foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{name} {str(out)!r} holds files moekit did not write ({shown}); move them away or choose another {name}"
        )


def check_output_dir(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    name: str = "directory",
) -> Path:
    """``out`` as a Path if an output directory may be written there; call it before any long work.

    The rules (``name`` is the argument named in the errors, e.g. ``"--out"``):

    * ``out`` is not, does not contain and does not lie inside any of ``inputs`` (``ValueError``);
    * ``out`` does not exist, or is an empty directory, or -- only with ``overwrite`` -- is a directory
      that moekit wrote and that holds no file moekit did not write (``FileExistsError``);
    * it can be created: its nearest existing ancestor is a writable directory (``OSError``).
    """
    out = Path(out)
    check_no_overlap(out, inputs, name=name)
    remove_stale_staging(out.absolute().parent)  # first: a killed replacement of ``out`` is put back
    if out.is_symlink():
        raise FileExistsError(f"{name} {str(out)!r} is a symbolic link; give the directory it points to, or another {name}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{name} {str(out)!r} exists and is not a directory; choose another {name}")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{name} {str(out)!r} already exists and is not empty (pass {_overwrite_hint(name)} to replace "
                    "an earlier output of moekit)"
                )
            check_replaceable(out, name=name)
    check_writable_parent(out, name=name)
    return out


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), so that a reused pid is not taken for its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22 of proc(5))


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts as gone; unknown as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return not Path("/proc/self/stat").exists() or _process_start(pid) is not None


def _owner_alive(marker: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a staging marker may still be running (unknown counts as alive)."""
    pid = marker.get("pid")
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    if not _pid_alive(pid):
        return False
    if Path("/proc/self/stat").exists():
        start = _process_start(pid)
        return start is not None and start == marker.get("start", start)
    return True


def _remove_owned(directory: Path) -> None:
    """Remove a moekit staging directory, its marker last (an interrupted removal stays recognisable)."""
    for child in directory.iterdir():
        if child.name == MARKER_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (directory / MARKER_NAME).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass


def remove_stale_staging(parent: str | os.PathLike[str]) -> list[Path]:
    """Clean up after interrupted moekit runs in ``parent``; returns the directories removed.

    Candidates are the staging (``.*.tmp``), set-aside (``.*.old``) and probe directories that moekit
    names ``.<name>.<pid>-<random>.<tmp|old>``. One is removed when its marker names it and its writing
    process (on this host) is gone, or when it is unmarked, holds nothing but an unfinished marker write
    and its writer (the pid in its name) is gone or it is older than a minute. A set-aside ``.old`` directory whose output was never
    replaced (the run died between its two renames, see ``publish_dir``) is first put back in place.
    """
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith((".tmp", ".old"))):
            continue
        if not entry.is_dir() or entry.is_symlink():
            continue
        marker = read_marker(entry)
        if marker is not None and marker.get("stage") == entry.name and not _owner_alive(marker):
            _restore_set_aside(entry, marker)
            _remove_owned(entry)
            removed.append(entry)
        elif marker is None and _only_marker_temps(entry):
            named = _STAGE_NAME.search(entry.name)
            try:
                if (named is not None and not _pid_alive(int(named.group(1)))) or \
                        time.time() - entry.stat().st_mtime > _UNMARKED_STAGE_AGE_S:
                    for temp in entry.iterdir():
                        temp.unlink()
                    entry.rmdir()
                    removed.append(entry)
            except OSError:
                pass
    return removed


def _only_marker_temps(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but unfinished marker writes (``atomic_write_text``'s
    ``.<marker>.*.tmp``): a staging directory whose writer died before its marker was in place."""
    try:
        return all(p.name.startswith(f".{MARKER_NAME}.") and p.name.endswith(".tmp") and p.is_file()
                   and not p.is_symlink() for p in directory.iterdir())  # fmt: skip
    except OSError:
        return False


def _restore_set_aside(entry: Path, marker: Mapping[str, Any]) -> None:
    """Put the output that ``publish_dir`` set aside in ``entry`` back, if nothing replaced it."""
    target, previous = marker.get("target"), entry / "previous"
    if not isinstance(target, str) or "/" in target or target in ("", ".", "..") or not previous.is_dir():
        return
    if not os.path.lexists(entry.parent / target):
        os.replace(previous, entry.parent / target)


def _new_marker(directory: Path, writer: str | None, target: str | None = None) -> dict[str, Any]:
    from . import __version__

    return {
        **({} if target is None else {"target": target}),
        "format": MARKER_FORMAT,
        "moekit": __version__,
        "writer": writer,
        "command": sys.argv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "stage": directory.name,
    }


def _private_dir(parent: Path, name: str, suffix: str, writer: str | None, target: str | None = None) -> Path:
    """A new marked directory ``.<name>.<pid>-<random><suffix>`` in ``parent`` with ordinary permissions
    (``target``: the output it sets aside, recorded in the marker)."""
    directory = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.{os.getpid()}-", suffix=suffix))
    directory.chmod(0o777 & ~_umask())  # mkdtemp makes the directory private; the result is an ordinary directory
    marker = _new_marker(directory, writer, target)
    atomic_write_text(directory / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
    return directory


def staging_dir(target: str | os.PathLike[str], *, writer: str | None = None) -> Path:
    """A new empty directory beside ``target`` (same filesystem, so it can be renamed onto it).

    It carries the moekit marker (which records ``writer``, the command line, the moekit version,
    the time and the writing process), so that a later run into the same parent removes it if this
    process dies before publishing it (``remove_stale_staging``, called here first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    return _private_dir(target.parent, target.name, ".tmp", writer)


def as_staging(directory: str | os.PathLike[str], target: str | os.PathLike[str], *, writer: str | None = None) -> Path:
    """Turn the finished directory ``directory`` (beside ``target``, e.g. a resumable run directory)
    into a staging directory of ``target``, ready for ``publish_dir``: it gets the marker, then the
    name, of one made by ``staging_dir`` -- so that from the rename on, a run killed before publishing
    leaves debris the next run removes, and before it, ``directory`` as it was."""
    directory, target = Path(directory), Path(target)
    stage = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    atomic_write_text(directory / MARKER_NAME, json.dumps(_new_marker(stage, writer), indent=2) + "\n")
    os.replace(directory, stage)
    return stage


def _ordinary_permissions(directory: Path) -> None:
    """Give every file below ``directory`` the permissions of a plain ``open()`` (some writers,
    such as safetensors, create private temporary files and rename them)."""
    mode = 0o666 & ~_umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _seal(staged: Path) -> None:
    """Record in the marker of ``staged`` every file it holds (what a later overwrite may remove)."""
    marker = read_marker(staged) or _new_marker(staged, None)
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file() or p.is_symlink())
    marker["files"] = [f for f in files if f != MARKER_NAME]
    atomic_write_text(staged / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


def publish_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Move the finished directory ``staged`` to ``target`` with renames only.

    The marker of ``staged`` gets the list of its files. A missing or empty ``target`` is replaced at
    once. An existing non-empty ``target`` is replaced only when ``overwrite`` and ``check_replaceable``
    allows it (moekit wrote it, nothing foreign inside): it is renamed into a marked ``.<name>.*.old``
    directory first and removed last, so a kill at any point leaves either the old or the new output
    at ``target`` (or, for an instant between the two renames, none: the next run puts the old one back)
    and debris the next run removes (``remove_stale_staging``).
    """
    staged, target = Path(staged), Path(target)
    _ordinary_permissions(staged)
    _seal(staged)
    if target.is_symlink():
        raise FileExistsError(f"output {str(target)!r} is a symbolic link; moekit does not replace links")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staged, target)  # rename(2) also replaces an empty directory
        return target
    if not overwrite:
        raise FileExistsError(
            f"output directory {str(target)!r} already exists (pass overwrite=True to replace it)"
        )
    if not target.is_dir():
        raise FileExistsError(f"output {str(target)!r} exists and is not a directory")
    check_replaceable(target, name="output directory")
    old = _private_dir(target.parent, target.name, ".old", "publish_dir", target=target.name)
    os.replace(target, old / "previous")
    os.replace(staged, target)
    _remove_owned(old)
    return target


@contextmanager
def atomic_directory(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    name: str = "directory",
    writer: str | None = None,
) -> Iterator[Path]:
    """Build a directory in a staging place and rename it to ``target`` only if the block succeeds.

    ``check_output_dir`` runs first (same arguments), so a bad ``target`` fails before any work. The
    published directory carries the marker ``.moekit-output.json`` (the command that wrote it, the
    moekit version, the time, its files); ``overwrite`` replaces only such a directory. On any error
    the staging directory is removed and ``target`` is left as it was.
    """
    target = check_output_dir(target, overwrite=overwrite, inputs=inputs, name=name)
    stage = staging_dir(target, writer=writer)
    try:
        yield stage
        publish_dir(stage, target, overwrite=overwrite)
    finally:
        if stage.exists():
            _remove_owned(stage)


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


def read_json(path: str | os.PathLike[str], *, what: str) -> Any:
    """The parsed JSON file ``path`` (a ``what``: "checkpoint config", "experiment results", ...); a file
    that is not UTF-8 JSON raises ``ValueError("corrupt <what> '<path>': <reason>")``. The caller checks
    that the file exists (its message says what the missing file means)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {what} {str(path)!r}: {err}") from None


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
