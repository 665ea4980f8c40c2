"""Atomic outputs: files and directories appear whole, with ordinary permissions, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from moekit.reporting import atomic_directory, atomic_write_text, markdown_table, mean_std, report_directory


def _mode(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_has_ordinary_permissions_and_replaces(tmp_path):
    path = tmp_path / "a" / "report.md"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert _mode(path) == 0o666 & ~_umask()
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_atomic_directory_publishes_only_on_success(tmp_path):
    out = tmp_path / "run"
    with atomic_directory(out) as stage:
        (stage / "x.txt").write_text("1")
        (stage / "private.bin").write_bytes(b"")
        (stage / "private.bin").chmod(0o600)  # as safetensors leaves its files
        assert not out.exists()
    assert (out / "x.txt").read_text() == "1"
    assert _mode(out) == 0o777 & ~_umask() and _mode(out / "private.bin") == 0o666 & ~_umask()
    (out / "private.bin").unlink()

    with pytest.raises(FileExistsError, match="run"):
        with atomic_directory(out):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out, overwrite=True) as stage:
            (stage / "y.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]  # the old result is intact
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging debris

    with atomic_directory(out, overwrite=True) as stage:
        (stage / "z.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["z.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_markdown_table_and_mean_std():
    table = markdown_table(["a", "b"], [[1, 2.5], ["x|y", float("nan")]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2.5 |\n| x\\|y | nan |\n"
    assert mean_std([1.0, 2.0, 3.0]) == "2 ± 0.82"


def test_report_directory_replaces_only_earlier_reports(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with report_directory(empty) as stage:
        (stage / "results.json").write_text("{}")
    with report_directory(empty) as stage:  # an earlier report is replaced whole
        (stage / "report.md").write_text("new")
    assert sorted(p.name for p in empty.iterdir()) == ["report.md"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier report"):
        with report_directory(mine):
            pass
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a directory"):
        with report_directory(tmp_path / "file"):
            pass
    assert (mine / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "keep me"
