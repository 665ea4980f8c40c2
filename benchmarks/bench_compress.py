"""Streamed compression of checkpoints larger than its memory bound: peak memory flat, time linear.

The script builds randomly initialised Qwen3-MoE checkpoints (64 experts per block; only the number
of decoder layers changes between sizes) in a temporary directory, then compresses each with
``moekit compress --max-memory M`` where M is a third of the largest checkpoint's size, one fresh
process per run (its peak resident memory, ``VmHWM``, is what is measured), and records per run: the
checkpoint size, peak resident memory, wall time, the compress time of every layer and the resident
memory of the process right after its imports. The largest checkpoint is compressed once more at the
smallest ``--max-memory`` the plan accepts (found by asking with 1MB and taking the budget each
refusal names), to show that the bound holds at its tightest. The largest checkpoint is also merged by the
whole-model path (``moekit merge``, which loads the model into memory) for comparison, when it fits.
Random weights say nothing about quality; only memory and time are measured here.

    python benchmarks/bench_compress.py            # -> benchmarks/results/bench_compress.{json,md}
    python benchmarks/bench_compress.py --quick    # tiny sizes (smoke test; results/bench_compress_quick.*)

Everything runs with one thread (``OMP_NUM_THREADS=1``, recorded with the command, versions and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "full": dict(hidden=256, moe_ffn=256, experts=64, top_k=4, vocab=2048, layers=(12, 24, 48), keep=16, samples=16, seq=64),
    "quick": dict(hidden=32, moe_ffn=32, experts=8, top_k=2, vocab=256, layers=(2, 4, 8), keep=4, samples=4, seq=16),
}
#: reads the peak resident memory of the child after it ran a moekit command
RUNNER = (
    "import json, sys, time\n"
    "from moekit.merging.memory import peak_rss_bytes, rss_bytes\n"
    "from moekit.cli.main import main\n"
    "import moekit.integrations.hf, transformers  # imports first: their memory is the process's floor\n"
    "floor = rss_bytes()\n"
    "start = time.perf_counter()\n"
    "rc = main(sys.argv[1:])\n"
    "print('RESULT ' + json.dumps({'rc': rc, 'seconds': time.perf_counter() - start, 'peak_rss': peak_rss_bytes(),"
    " 'import_rss': floor}))\n"
)


def build(directory: Path, shape: dict, layers: int, seed: int) -> int:
    """A random Qwen3-MoE checkpoint with ``layers`` decoder layers in ``directory``; returns its bytes."""
    script = (
        "import sys, torch, transformers as tf\n"
        f"torch.manual_seed({seed})\n"
        f"cfg = tf.Qwen3MoeConfig(vocab_size={shape['vocab']}, hidden_size={shape['hidden']}, intermediate_size="
        f"{2 * shape['hidden']}, moe_intermediate_size={shape['moe_ffn']}, num_hidden_layers={layers}, "
        f"num_attention_heads=4, num_key_value_heads=2, head_dim={shape['hidden'] // 4}, num_experts={shape['experts']}, "
        f"num_experts_per_tok={shape['top_k']}, max_position_embeddings=512, norm_topk_prob=True, tie_word_embeddings=False)\n"
        "model = tf.Qwen3MoeForCausalLM(cfg).eval()\n"
        "with torch.no_grad():\n"
        "    for n, p in model.named_parameters():\n"
        "        if n.endswith('mlp.gate.weight'): p.normal_(0.0, 0.5)\n"
        "model.save_pretrained(sys.argv[1], max_shard_size='200MB')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, env=_env(), capture_output=True)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def run_cli(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], env=_env(), capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    error = (done.stderr.strip().splitlines() or ["?"])[-1]
    if not lines:
        return {"rc": done.returncode, "error": error}
    result = json.loads(lines[-1][len("RESULT "):])
    return result if result["rc"] == 0 else {**result, "error": error}


def calib_args(shape: dict) -> list[str]:
    return ["--calib", "stdlib", "--calib-samples", str(shape["samples"]), "--seq-len", str(shape["seq"]),
            "--batch-size", "8", "--quiet"]  # fmt: skip


def streamed(work: Path, shape: dict, layers: int, size: int, budget: int, path: str = "streamed") -> dict:
    """One ``moekit compress --max-memory budget`` run of the ``layers`` checkpoint, as a result row."""
    out = work / f"out{layers}"
    cmd = ["compress", str(work / f"L{layers}"), "--experts", str(shape["keep"]), "--max-memory", str(budget),
           "--out", str(out), *calib_args(shape)]  # fmt: skip
    result = run_cli(cmd)
    row = {"path": path, "layers": layers, "checkpoint_bytes": size, "max_memory": budget,
           "command": "moekit " + " ".join(cmd), **result}  # fmt: skip
    if result.get("rc") == 0:
        report = json.loads((out / "compress_report.json").read_text())
        row.update(per_layer_seconds=list(report["unit_seconds"].values()), output_bytes=report["weights_bytes_after"],
                   estimate=report["memory"]["estimate"], plan=report["memory"])  # fmt: skip
        shutil.rmtree(out)
    return row


def tightest(work: Path, shape: dict, layers: int, size: int) -> dict:
    """The run at the smallest budget the plan accepts: ask with 1 MB, rerun with what each refusal names."""
    budget = 10**6
    for _ in range(4):
        row = streamed(work, shape, layers, size, budget, path="streamed, smallest accepted budget")
        enough = re.search(r"give at least (\d+\.\d+) (MB|GB)", row.get("error", ""))
        if row.get("rc") == 0 or enough is None:
            return row
        budget = round(float(enough.group(1)) * (1e6 if enough.group(2) == "MB" else 1e9))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and MD go")
    parser.add_argument("--workdir", default=None, help="where checkpoints are built (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random checkpoints")
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    shape = SHAPES[name]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moekit-bench-compress-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    runs, sizes = [], {}
    try:
        for layers in shape["layers"]:
            sizes[layers] = build(work / f"L{layers}", shape, layers, args.seed)
            print(f"built {layers} layers: {sizes[layers] / 1e9:.3f} GB", flush=True)
        # a third of the largest checkpoint (tiny --quick checkpoints: a third is below the imports' own memory)
        budget = int(1.5e9) if args.quick else max(sizes.values()) // 3
        for layers in shape["layers"]:
            runs.append(streamed(work, shape, layers, sizes[layers], budget))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "per_layer_seconds"}), flush=True)
        largest = max(shape["layers"])
        runs.append(tightest(work, shape, largest, sizes[largest]))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "per_layer_seconds"}), flush=True)
        cmd = ["merge", str(work / f"L{largest}"), "--experts", str(shape["keep"]), "--form", "exact",
               "--out", str(work / "merged"), *calib_args(shape)]  # fmt: skip
        result = run_cli(cmd)
        runs.append({"path": "whole-model (moekit merge)", "layers": largest, "checkpoint_bytes": sizes[largest],
                     "command": "moekit " + " ".join(cmd), **result})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    write(Path(args.out), name, shape, runs, args.seed)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def write(out: Path, name: str, shape: dict, runs: list[dict], seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_compress" if name == "full" else "bench_compress_quick"
    meta = {"command": " ".join([sys.executable, *sys.argv]), "threads": 1, "seed": seed, "cpu_count": os.cpu_count(),
            "versions": _versions(), "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps({**meta, "runs": runs}, indent=2) + "\n")
    lines = [
        f"# bench_compress ({name})", "",
        f"Qwen3-MoE, random weights, {shape['experts']} experts/block -> {shape['keep']} (m-smoe, global budget, exact "
        f"form), hidden {shape['hidden']}, expert FFN {shape['moe_ffn']}; 1 thread; {meta['date']}.", "",
        "| path | layers | checkpoint | --max-memory | peak RSS | RSS after imports | wall time | s/layer (mean) | output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in runs:
        if r.get("rc") != 0:
            lines.append(f"| {r['path']} | {r['layers']} | {_size(r['checkpoint_bytes'])} | | failed: {r.get('error', '?')} | | | | |")
            continue
        per = r.get("per_layer_seconds") or []
        mean = f"{sum(per) / len(per):.2f}" if per else ""
        budget = _size(r["max_memory"]) if "max_memory" in r else "none (loads the model)"
        outb = _size(r["output_bytes"]) if "output_bytes" in r else ""
        lines.append(f"| {r['path']} | {r['layers']} | {_size(r['checkpoint_bytes'])} | {budget} | "
                     f"{_size(r['peak_rss'])} | {_size(r['import_rss'])} | {r['seconds']:.0f} s | {mean} | {outb} |")  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
