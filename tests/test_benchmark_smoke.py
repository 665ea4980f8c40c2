"""The speed benchmark runs (tiny shapes) and writes its table; ratios are not asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_moe_quick(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_moe.py"), "--quick", "--reps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "bench_moe_quick.json").read_text())["results"]["tiny"]["rows"]
    impls = {r["impl"] for r in results if "error" not in r}
    assert {"dense_bound", "moekit", "hf_eager"} <= impls
    assert "| moekit |" in (tmp_path / "bench_moe_quick.md").read_text()


@pytest.mark.slow
def test_bench_compress_quick(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_compress.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "bench_compress_quick.json").read_text())["runs"]
    assert [r["rc"] for r in runs] == [0, 0, 0, 0]
    assert all(r["peak_rss"] <= r["max_memory"] for r in runs if "max_memory" in r)
    assert "| streamed |" in (tmp_path / "bench_compress_quick.md").read_text()
