"""Atomic outputs: directories appear whole, with ordinary permissions and moekit's marker, or not at
all; an overwrite replaces only what moekit wrote; debris of killed runs is removed by the next run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.reporting import (
    MARKER_NAME,
    atomic_directory,
    atomic_write_text,
    check_output_dir,
    markdown_table,
    mean_std,
    read_json,
    read_marker,
    remove_stale_staging,
    staging_dir,
)


def _mode(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_file_has_ordinary_permissions_and_replaces(tmp_path):
    path = tmp_path / "a" / "report.md"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert _mode(path) == 0o666 & ~_umask()
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_atomic_directory_publishes_only_on_success(tmp_path):
    out = tmp_path / "run"
    with atomic_directory(out, writer="test") as stage:
        (stage / "x.txt").write_text("1")
        (stage / "private.bin").write_bytes(b"")
        (stage / "private.bin").chmod(0o600)  # as safetensors leaves its files
        assert not out.exists()
    assert (out / "x.txt").read_text() == "1"
    assert _mode(out) == 0o777 & ~_umask() and _mode(out / "private.bin") == 0o666 & ~_umask()
    marker = read_marker(out)
    assert marker["writer"] == "test" and marker["files"] == ["private.bin", "x.txt"]
    assert marker["moekit"] and marker["created"] and marker["command"] == sys.argv
    (out / "private.bin").unlink()

    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with atomic_directory(out):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out, overwrite=True) as stage:
            (stage / "y.txt").write_text("half")
            raise RuntimeError("boom")
    assert _names(out) == [MARKER_NAME, "x.txt"]  # the old result is intact
    assert _names(tmp_path) == ["run"]  # no staging debris

    with atomic_directory(out, overwrite=True) as stage:
        (stage / "z.txt").write_text("3")
    assert _names(out) == [MARKER_NAME, "z.txt"]
    assert _names(tmp_path) == ["run"]


def test_markdown_table_and_mean_std():
    table = markdown_table(["a", "b"], [[1, 2.5], ["x|y", float("nan")]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2.5 |\n| x\\|y | nan |\n"
    assert mean_std([1.0, 2.0, 3.0]) == "2 ± 0.82"


def test_read_json_names_the_file_and_what_it_is(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(good, what="test results") == {"a": [1, 2]}
    (tmp_path / "bad.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^corrupt test results '.*bad\.json': Expecting"):
        read_json(tmp_path / "bad.json", what="test results")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match=r"^corrupt test results '.*latin1\.json': 'utf-8' codec"):
        read_json(tmp_path / "latin1.json", what="test results")


def test_an_empty_directory_may_be_used_without_overwrite(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with atomic_directory(out) as stage:
        (stage / "a.txt").write_text("a")
    assert _names(out) == [MARKER_NAME, "a.txt"]


def test_overwrite_never_deletes_a_file_moekit_did_not_write(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.json").write_text("{}")  # looks like a report, but moekit did not write it
    (user / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(user)
    with pytest.raises(FileExistsError, match="was not written by moekit"):
        with atomic_directory(user, overwrite=True):
            pass
    assert _names(user) == ["results.json", "thesis.tex"]

    out = tmp_path / "report"
    with atomic_directory(out) as stage:
        (stage / "report.md").write_text("r")
        (stage / "sub").mkdir()
        (stage / "sub" / "a.png").write_bytes(b"png")
    (out / "sub" / "notes.txt").write_text("my notes")  # the user added a file to moekit's output
    with pytest.raises(FileExistsError, match=r"holds files moekit did not write \(sub/notes.txt\)"):
        check_output_dir(out, overwrite=True, name="--out")
    assert (out / "sub" / "notes.txt").read_text() == "my notes"

    (tmp_path / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "keep me"


def test_nested_moekit_outputs_count_as_moekit_files(tmp_path):
    report = tmp_path / "report"
    with atomic_directory(report) as stage:
        (stage / "results.json").write_text("{}")
    with atomic_directory(report / "analysis" / "run0") as stage:  # e.g. moekit analyze into a run directory
        (stage / "report.md").write_text("a")
    check_output_dir(report, overwrite=True)  # everything inside was written by moekit
    with atomic_directory(report, overwrite=True) as stage:
        (stage / "results.json").write_text("{}")
    assert _names(report) == [MARKER_NAME, "results.json"]


def test_output_must_not_overlap_an_input(tmp_path):
    src = tmp_path / "parent" / "ckpt"
    src.mkdir(parents=True)
    for out, relation in ((src, "is"), (src.parent, "contains"), (src / "sub", "lies inside")):
        with pytest.raises(ValueError, match=f"--out '{out}' {relation} the input '{src}'"):
            check_output_dir(out, inputs=[src], overwrite=True, name="--out")
    link = tmp_path / "link"
    link.symlink_to(src.parent)
    with pytest.raises(ValueError, match="contains the input"):
        check_output_dir(link, inputs=[src])
    check_output_dir(tmp_path / "elsewhere", inputs=[src])


def test_unwritable_output_parent_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--out '.*file/out' cannot be created: '.*file' is not a directory"):
        check_output_dir(tmp_path / "file" / "out", name="--out")
    with pytest.raises(PermissionError, match="--out '/proc/moekit-out' cannot be written: '/proc' is not writable"):
        check_output_dir("/proc/moekit-out", name="--out")
    check_output_dir(tmp_path / "new" / "deeper" / "out")
    assert _names(tmp_path) == ["file"]  # the check leaves nothing behind


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_and_old_directories_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    stale = staging_dir(out)
    (stale / "model.safetensors").write_bytes(b"half")
    old = staging_dir(out)
    marker = read_marker(stale)
    for directory, suffix in ((stale, ".tmp"), (old, ".old")):
        if suffix == ".old":
            directory = directory.rename(directory.with_name(directory.name.removesuffix(".tmp") + ".old"))
        (directory / MARKER_NAME).write_text(json.dumps({**marker, "stage": directory.name, "pid": _dead_pid()}))
    live = staging_dir(tmp_path / "other")  # this process is alive: its staging directory stays
    foreign = tmp_path / ".mine.tmp"  # hidden directory of the user: no marker
    foreign.mkdir()
    (foreign / "data").write_text("keep")
    with atomic_directory(out) as stage:
        (stage / "a").write_text("a")
    assert _names(tmp_path) == [".mine.tmp", live.name, "out"]
    assert remove_stale_staging(tmp_path) == []


def test_a_replacement_killed_between_its_two_renames_is_put_back(tmp_path):
    """publish_dir sets the old output aside, then renames the new one in: a run killed between the two
    renames leaves no output; the next run (any check of that --out) puts the old one back."""
    from moekit import reporting

    out = tmp_path / "out"
    with atomic_directory(out) as stage:
        (stage / "report.md").write_text("old report")
    old = reporting._private_dir(tmp_path, "out", ".old", "publish_dir", target="out")  # noqa: SLF001
    os.replace(out, old / "previous")
    marker = read_marker(old)
    (old / MARKER_NAME).write_text(json.dumps({**marker, "pid": _dead_pid()}))  # its writer was killed
    with pytest.raises(FileExistsError, match="already exists and is not empty"):  # without --overwrite: refused
        check_output_dir(out)
    assert (out / "report.md").read_text() == "old report" and _names(tmp_path) == ["out"]


def test_staging_killed_before_its_marker_is_removed_but_never_a_user_directory(tmp_path):
    """A staging (or probe) directory is named after its writer's pid, so a run killed before the marker
    was in place (only the marker's temporary file inside) leaves debris the next run can tell apart."""
    pid = _dead_pid()
    unmarked = tmp_path / f".out.{pid}-abc123.tmp"
    unmarked.mkdir()
    (unmarked / f".{MARKER_NAME}.x1y2.tmp").write_text("{")
    probe = tmp_path / f".moekit-probe.{pid}-q9.tmp"
    probe.mkdir()
    user = tmp_path / f".notes.{pid}-abc.tmp"  # named like ours, but holds a file moekit never writes
    user.mkdir()
    (user / "thesis.tex").write_text("keep")
    assert sorted(p.name for p in remove_stale_staging(tmp_path)) == sorted([unmarked.name, probe.name])
    assert _names(tmp_path) == [user.name] and (user / "thesis.tex").read_text() == "keep"
