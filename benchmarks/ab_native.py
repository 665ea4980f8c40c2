"""A/B two revisions of the native kernel (``native_gemv.c``) on whole MoE layers, interleaved in one process.

On a shared VM two runs of ``bench_infer.py`` differ by up to 25%; a kernel change is judged here instead:
both builds load side by side (``native_gemv.load``), every round calls each one's ``moekit_moe_ffn`` on the
same weights, tokens and routing (random top-k, as the router gives), each call after 64 MB of other reads
(``bench_infer.flush_caches``: in a model's decode loop every other layer's weights pass between two calls of
one layer; ``--warm`` leaves them out, and a layer smaller than the L3 then reads partly from cache: Qwen3 bf16
T=1 read 1.13-1.16x faster warm), and the best round of each is kept.
Outputs are compared (the largest absolute difference). Shapes: ``bench_infer.SHAPES``.

    python benchmarks/ab_native.py --base c87c436                     # base revision against the worktree
    python benchmarks/ab_native.py --base c87c436 --head 96ddbd5 --tokens 16,256

``--huge-pages``: the weights on transparent huge pages (``moekit.experts.to_huge_pages``). ``--panels``: both builds read panel copies of the weights (the worktree's ``pack_panels``; AVX2 builds with
panel arguments), as a packed bank's layer does.

Writes ``results/ab_native.{json,md}`` (``--out``; ``_2threads`` with ``--threads 2``, ``_panels`` with ``--panels``, ``_huge_pages`` with ``--huge-pages``): per layer, dtype and T the read rate of each build
(touched experts' bytes / time) and head / base (> 1: the head is faster).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import DTYPES, QUICK, SHAPES, flush_caches, page_backing, require_huge_pages  # noqa: E402

from moekit.experts import native_gemv, to_huge_pages  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build(revision: str | None, into: Path) -> Path:
    """The kernel of ``revision`` (None: the worktree's file) compiled with moekit's flags into ``into``."""
    source = into / f"native_gemv-{revision or 'worktree'}.c"
    if revision is None:
        source.write_bytes(native_gemv.SOURCE.read_bytes())
    else:
        rel = native_gemv.SOURCE.resolve().relative_to(REPO)
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{rel.as_posix()}"], capture_output=True)
        if shown.returncode:
            raise SystemExit(f"revision {revision!r} has no {rel.as_posix()}: {shown.stderr.decode().strip()}")
        source.write_bytes(shown.stdout)
    target = source.with_suffix(".so")
    cc = native_gemv._compiler()
    if cc is None:
        raise SystemExit("no C compiler: the A/B needs one to build both revisions")
    subprocess.run([cc, *native_gemv.FLAGS, "-fopenmp", str(source), "-o", str(target), "-lm"], check=True)
    return target


def layer_call(lib, W1: torch.Tensor, W2: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
               threads: int, panels: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:  # fmt: skip
    """One SwiGLU MoE layer on ``lib``: W1 [E, 2F, D], W2 [E, D, F], x [T, D], ids / w [T, K] into y [T, D];
    ``panels``: ``pack_panels`` of W1 and W2, read where the build's broadcast tiles run."""
    E, R, D = W1.shape
    F_ = W2.shape[2]
    if panels is not None:
        panels = tuple(p.data_ptr() for p in panels)
    elif hasattr(lib, "moekit_pack_panels"):
        panels = (None, None)  # plain weights on builds with panel arguments
    else:
        panels = ()
    status = lib.moekit_moe_ffn(W1.data_ptr(), W1.stride(0), W1.stride(1), None, 0, W2.data_ptr(), W2.stride(0), W2.stride(1),
                                None, 0, *panels, F_, D, D, E, x.data_ptr(), x.shape[0], D, ids.data_ptr(), w.data_ptr(), None,
                                ids.shape[1], y.data_ptr(), native_gemv._DTYPES[W1.dtype], 1, 0, threads)  # fmt: skip
    if status:
        raise RuntimeError(f"moekit_moe_ffn returned {status}")


def compare(libs: dict, shape: dict, dtype: torch.dtype, tokens: list[int], reps: int, threads: int,
            panels: bool = False, warm: bool = False, huge_pages: bool = False) -> list[dict]:  # fmt: skip
    D, Fh, E, K = shape["D"], shape["F"], shape["E"], shape["K"]
    g = torch.Generator().manual_seed(0)
    weights = torch.nn.Module()
    weights.register_buffer("W1", torch.empty(E, 2 * Fh, D, dtype=dtype))
    weights.register_buffer("W2", torch.empty(E, D, Fh, dtype=dtype))
    for e in range(E):
        weights.W1[e] = torch.randn(2 * Fh, D, generator=g) / D**0.5
        weights.W2[e] = torch.randn(D, Fh, generator=g) / Fh**0.5
    if huge_pages:
        to_huge_pages(weights, min_bytes=1)
    W1, W2 = weights.W1, weights.W2
    copies = (native_gemv.pack_panels(W1, Fh), native_gemv.pack_panels(W2)) if panels else None
    rows = []
    for T in tokens:
        x = torch.randn(T, D, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).contiguous()
        w = torch.rand(T, K, generator=g)
        touched_bytes = ids.unique().numel() * 3 * Fh * D * W1.element_size()
        outs = {name: torch.empty(T, D, dtype=dtype) for name in libs}
        best = dict.fromkeys(libs, float("inf"))
        for _ in range(reps):
            for name, lib in libs.items():
                if not warm:
                    flush_caches()
                start = time.perf_counter()
                layer_call(lib, W1, W2, x, ids, w, outs[name], threads, copies)
                best[name] = min(best[name], time.perf_counter() - start)
        diff = float((outs["head"].float() - outs["base"].float()).abs().max())
        rows.append({"T": T, "base_ms": 1e3 * best["base"], "head_ms": 1e3 * best["head"],
                     "base_gbs": touched_bytes / best["base"] / 1e9, "head_gbs": touched_bytes / best["head"] / 1e9,
                     "speedup": best["base"] / best["head"], "max_abs_diff": diff})  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    a = results["args"]
    lines = [f"Native kernel A/B: base `{a['base']}` against head `{a['head'] or 'worktree'}`, `moekit_moe_ffn` on one "
             f"SwiGLU MoE layer{' on panel copies' if a.get('panels') else ''}, random top-k routing, {a['threads']} thread(s), best of {a['reps']} interleaved rounds "
             f"(wall time), {'caches warm (no flush between calls)' if a.get('warm') else 'caches flushed before every call (64 MB read)'}{', weights on huge pages (`to_huge_pages`)' if a.get('huge_pages') else ''}. "
             "Rates: touched experts' bytes / time.", "",
             "| layer | dtype | T | base ms | head ms | base GB/s | head GB/s | head speed-up | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["rows"]:
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['T']} | {r['base_ms']:.1f} | {r['head_ms']:.1f} | {r['base_gbs']:.1f} | "
                     f"{r['head_gbs']:.1f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision of the base kernel")
    ap.add_argument("--head", default=None, help="git revision of the head kernel (default: the worktree's file)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {sorted(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated subset of {list(DTYPES)} (default fp32,bf16)")
    ap.add_argument("--tokens", default="1,4,16,256", help="comma-separated token counts")
    ap.add_argument("--reps", type=int, default=10, help="interleaved rounds (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="threads of each call (and torch's)")
    ap.add_argument("--panels", action="store_true", help="both builds read panel copies of the weights (AVX2)")
    ap.add_argument("--warm", action="store_true", help="no cache flush before each call (a layer smaller than the L3 "
                    "then reads partly from cache, as none does in a model's decode loop)")
    ap.add_argument("--huge-pages", action="store_true", help="the layers' weights on transparent huge pages "
                    "(moekit.experts.to_huge_pages; panel copies stay where they are)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    shapes = QUICK if args.quick else SHAPES
    if args.quick:
        args.shapes = ",".join(QUICK)
    for name in args.shapes.split(","):
        if name not in shapes:
            ap.error(f"--shapes: unknown shape {name!r}; choose from {sorted(SHAPES)}")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    if any(t < 1 for t in tokens) or args.reps < 1 or args.threads < 1:
        ap.error(f"--tokens, --reps and --threads must be positive, got {tokens}, {args.reps}, {args.threads}")
    if args.huge_pages:
        require_huge_pages(ap, "--huge-pages")
    torch.set_num_threads(args.threads)
    from moekit.reporting import atomic_write_text, environment, write_json

    with tempfile.TemporaryDirectory(prefix="moekit-ab-") as tmp:
        libs = {"base": native_gemv.load(build(args.base, Path(tmp))), "head": native_gemv.load(build(args.head, Path(tmp)))}
        if args.panels and not (native_gemv.panels_available() and all(hasattr(lib, "moekit_pack_panels") for lib in libs.values())):
            ap.error("--panels: this CPU's kernel reads no panel copies, or a build is older than the panel arguments")
        for dname in args.dtypes.split(","):
            code = native_gemv._DTYPES[DTYPES[dname]]
            if code > 1 and not all(hasattr(lib, "moekit_dtype_usable") and lib.moekit_dtype_usable(code) for lib in libs.values()):
                ap.error(f"--dtypes {dname}: a build has no {dname} products (older than them, or built without F16C)")
        rows = []
        for layer in args.shapes.split(","):
            for dname in args.dtypes.split(","):
                for r in compare(libs, shapes[layer], DTYPES[dname], tokens, args.reps, args.threads, args.panels, args.warm,
                                   args.huge_pages):
                    rows.append({"layer": layer, "dtype": dname, **r})
                    print(f"{layer} {dname} T={r['T']}: base {r['base_gbs']:.1f} GB/s, head {r['head_gbs']:.1f} GB/s, "
                          f"head {r['speedup']:.2f}x, max abs diff {r['max_abs_diff']:.1e}", flush=True)  # fmt: skip
    env = {**environment(), "command": " ".join(sys.argv), "kernel": native_gemv.build_info(), "seed": 0, "pages": page_backing()}
    results = {"args": vars(args), "environment": env, "rows": rows}
    out, tag = Path(args.out), "ab_native" + (f"_{args.threads}threads" if args.threads > 1 else "") + ("_panels" if args.panels else "")
    tag += "_huge_pages" if args.huge_pages else ""
    write_json(out / f"{tag}.json", results)
    atomic_write_text(out / f"{tag}.md", markdown(results))


if __name__ == "__main__":
    main()
