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
    assert [r["rc"] for r in runs] == [0, 0, 0, 0, 0]  # 3 sizes, the largest at the smallest budget, merge
    assert all(r["peak_rss"] <= r["max_memory"] for r in runs if "max_memory" in r)
    assert "| streamed |" in (tmp_path / "bench_compress_quick.md").read_text()


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """``benchmarks/gpu.sh --dry-run`` runs every step (cuda tests, training and inference benchmarks) on CPU."""
    pytest.importorskip("transformers")
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "== 3/3" in done.stdout and "gpu.sh: done" in done.stdout
    rows = json.loads((tmp_path / "bench_gpu_quick_cpu.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"inference", "train"}
    for r in rows:
        assert {"moekit", "hf_grouped_mm"} <= set(r["impls"]), r
        assert all(v.get("matches_moekit") for v in r["impls"].values()), r
    assert (tmp_path / "bench_moe_quick.json").exists()


def test_gpu_script_refuses_unknown_arguments() -> None:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_bench_infer_quick_pieces_assemble(tmp_path: Path) -> None:
    """Two pieces of the inference benchmark (tiny shapes), each with its load, combined by --assemble."""
    pytest.importorskip("transformers")
    script = str(ROOT / "benchmarks" / "bench_infer.py")
    for dtype in ("fp32", "bf16"):
        done = subprocess.run(
            [sys.executable, script, "--quick", "--reps", "1", "--dtypes", dtype, "--tokens", "1,64", "--no-generate",
             "--profile", "--out", str(tmp_path / dtype)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    pieces = [str(tmp_path / d / "bench_infer_quick.json") for d in ("fp32", "bf16")]
    done = subprocess.run([sys.executable, script, "--quick", "--assemble", *pieces, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "bench_infer_quick.json").read_text())
    assert [(r["dtype"], r["T"]) for r in results["rows"]] == [("fp32", 1), ("fp32", 64), ("bf16", 1), ("bf16", 64)]
    assert len(results["pieces"]) == 2 and all(len(p["load_average"]["start"]) == 3 for p in results["pieces"])
    assert all(set(p["pages"]) == {"transparent_hugepage", "THP_MEM_ALLOC_ENABLE", "to_huge_pages"} for p in results["pieces"])
    assert not any(p["pages"]["to_huge_pages"] for p in results["pieces"])  # no --huge-pages: weights as allocated
    last = json.loads(Path(pieces[-1]).read_text())
    assert results["environment"] == last["environment"]  # the last piece's
    for r in results["rows"]:
        assert all(v.get("matches_moekit", True) for v in r["impls"].values()), r
    import torch

    from moekit.experts import upcast_gemm

    for r in results["rows"]:  # bf16 without oneDNN bf16: the dense bound on fp32 copies, only where compute-bound
        dense = {k for k in r["bounds"] if k.startswith("dense")}
        if r["dtype"] == "bf16" and upcast_gemm.torch_gemm_is_reference(torch.bfloat16):
            assert dense == ({"dense_fp32"} if r["T"] * 2 >= 64 else set()), (r["T"], dense)  # tiny: K = 2
            assert (r["dense_bound_s"] == 0.0) == (not dense)
        else:
            assert "dense" in dense, dense
    assert "GEMV-rate bound" in done.stdout and "| tiny | bf16 | 64 |" in (tmp_path / "bench_infer_quick.md").read_text()
    summary = done.stdout.split("**Summary: moekit's best path")[1].splitlines()
    for r in results["rows"]:  # last columns: moekit's best time over the sum of the two bounds, over the floor
        line = next(s for s in summary if s.startswith(f"| {r['layer']} | {r['dtype']} | {r['T']} |"))
        best = min(r["impls"]["moekit"]["best_s"], r["impls"]["moekit_packed"]["best_s"])
        assert line.split("|")[-3].strip() == f"{best / (r['bw_bound_s'] + r['dense_bound_s']):.2f}", line
        assert line.split("|")[-2].strip() == f"{best / r['floor_s']:.2f}", line
        # the floor: every touched expert at least its read, at least all routed rows' multiply-adds at the peak
        assert sum(r["expert_rows"]) == r["T"] * 2 and len(r["expert_rows"]) == r["touched_experts"]
        macs = r["T"] * 2 * 3 * 64 * 128  # tiny: K = 2, D = 64, F = 128
        assert r["floor_s"] >= max(r["bw_bound_s"], macs / (r["mm_peak_GMACs"] * 1e9)) * (1 - 1e-9), r


@pytest.mark.slow
def test_ab_native_quick_compares_two_builds(tmp_path: Path) -> None:
    """The kernel A/B builds a git revision and the worktree side by side; the same source gives the same
    outputs bit for bit, every row carries both rates; an unknown revision is refused by name."""
    from moekit.experts import native_gemv

    if not native_gemv.available():
        pytest.skip("no native kernel here")
    script = str(ROOT / "benchmarks" / "ab_native.py")
    done = subprocess.run([sys.executable, script, "--base", "HEAD", "--quick", "--tokens", "1,9,40", "--reps", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "ab_native.json").read_text())["rows"]
    assert [(r["dtype"], r["T"]) for r in rows] == [(d, t) for d in ("fp32", "bf16") for t in (1, 9, 40)]
    assert all(r["max_abs_diff"] == 0.0 and r["base_gbs"] > 0 and r["head_gbs"] > 0 for r in rows), rows
    assert "| tiny | bf16 | 40 |" in (tmp_path / "ab_native.md").read_text()
    bad = subprocess.run([sys.executable, script, "--base", "no-such-rev", "--quick", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert bad.returncode != 0 and "no-such-rev" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_bench_pages_quick_compares_page_kinds(tmp_path: Path) -> None:
    """The huge-page benchmark times one bank as allocated against its copy after ``to_huge_pages``: identical
    outputs, both rates, every moved tensor reported; ``bench_infer.py --huge-pages`` names the move in its
    first line."""
    from moekit.experts import huge_pages

    try:
        huge_pages.thp_support()
    except RuntimeError as e:
        pytest.skip(str(e))
    script = str(ROOT / "benchmarks" / "bench_pages.py")
    done = subprocess.run([sys.executable, script, "--quick", "--tokens", "1,9", "--reps", "1", "--dtypes", "bf16",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_pages_quick.json").read_text())["rows"]
    assert [(r["dtype"], r["T"]) for r in rows] == [("bf16", 1), ("bf16", 9)]
    assert all(r["max_abs_diff"] == 0.0 and r["GBps"]["4k"] > 0 and r["GBps"]["huge"] > 0 for r in rows), rows
    assert rows[0]["moved"]["tensors"] == 2 and rows[0]["moved"]["moved_bytes"] == 3 * 8 * 64 * 128 * 2  # tiny, bf16
    assert "| tiny | bf16 | 9 |" in (tmp_path / "bench_pages_quick.md").read_text()
    infer = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "--quick", "--huge-pages",
                            "--tokens", "1", "--reps", "1", "--dtypes", "fp32", "--no-generate", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert infer.returncode == 0, infer.stderr[-2000:]
    first = (tmp_path / "bench_infer_quick_huge_pages.md").read_text().splitlines()[0]
    assert "moved onto huge pages (`to_huge_pages`)" in first
    assert json.loads((tmp_path / "bench_infer_quick_huge_pages.json").read_text())["environment"]["pages"]["to_huge_pages"]


@pytest.mark.slow
def test_bench_generate_quick_times_every_variant(tmp_path: Path) -> None:
    """End-to-end generate at (here tiny) layer shapes: every variant timed, moekit's tokens (fp32) those of
    eager, the huge-page copy where this machine has huge pages."""
    pytest.importorskip("transformers")
    from moekit.experts import huge_pages

    try:
        huge_pages.thp_support()
        extra, variants = [], ["eager", "grouped_mm", "moekit", "moekit_linears", "moekit_huge_pages", "moekit_linears_huge_pages"]
    except RuntimeError:
        extra, variants = ["--no-huge-pages"], ["eager", "grouped_mm", "moekit", "moekit_linears"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--quick", "--layers", "2",
                           "--vocab", "256", "--prompt", "4", "--new-tokens", "4", "--rounds", "1", "--dtype", "fp32",
                           *extra, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_generate_quick_fp32_2layers.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants
    assert all(r["tokens_per_s"] > 0 and r["same_tokens_as_eager"] for r in rows), rows
    assert "| qwen3_moe | moekit |" in (tmp_path / "bench_generate_quick_fp32_2layers.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--layers", "0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "--layers must be >= 1, got 0" in bad.stderr


@pytest.mark.slow
def test_bench_linears_quick_compares_with_torch(tmp_path: Path) -> None:
    """The dense-product benchmark times the switched module against F.linear on one weight: both times, the same
    outputs (fp32 to rounding), a table row per dtype."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_linears.py"), "--quick", "--reps", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "bench_linears_quick.json").read_text())["results"]
    assert [(r["dtype"], sorted(r["rows"])) for r in res] == [("fp32", ["1", "4"]), ("bf16", ["1", "4"])]
    cells = [v for r in res for v in r["rows"].values()]
    assert all(v["torch_s"] > 0 and v["moekit_s"] > 0 for v in cells)
    assert all(v["max_abs_diff"] <= 1e-4 for v in res[0]["rows"].values())
    assert "| tiny [64, 96] | bf16 |" in (tmp_path / "bench_linears_quick.md").read_text()
