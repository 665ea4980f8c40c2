"""Greedy ``generate`` at real layer shapes: a few Qwen3-30B-A3B-, Mixtral-8x7B- or OLMoE-shaped decoder layers (random
weights, a 32k vocabulary so that the output layer does not hide the experts), tokens/s with transformers' experts
implementations, moekit's, moekit's with the model's plain linears on moekit's kernels too
(``moekit.experts.linears_for_inference``: attention projections and the output layer), and both after
``moekit.experts.to_huge_pages`` (a second copy of the model).

``bench_infer.py`` times one layer's experts and ``generate`` on tiny configs (where per-call overhead rules);
this is the end-to-end number at the sizes people run on CPUs: per token, every layer's router, attention and
touched experts, and the output layer. Timing interleaves the variants (``bench_infer.time_generate``: one
warm-up round, then ``--rounds``, best kept; process CPU time at 1 thread, wall time with more).

    python benchmarks/bench_generate.py                      # -> results/bench_generate.{json,md}, bf16, 1 thread
    python benchmarks/bench_generate.py --dtype fp32 --layers 2      # -> results/bench_generate_fp32_2layers.*
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import DTYPES, experts_as, page_backing, require_huge_pages, save, time_generate  # noqa: E402

#: decoder layers of the real models' shapes (Mixtral's intermediate size a quarter of 14336, as bench_infer's
#: layer: 8 experts of 14336 would be 2.8 GB a layer in bf16)
MODELS = {
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    "mixtral": dict(hidden_size=4096, intermediate_size=3584, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                  num_experts=64, num_experts_per_tok=8),
}  # fmt: skip
QUICK = {"qwen3_moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)}  # fmt: skip
IMPLS = ("eager", "grouped_mm", "moekit")


def build(family: str, shape: dict, layers: int, vocab: int, dtype: torch.dtype):
    import transformers as tf

    config_cls, model_cls = {"qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
                             "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
                             "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM)}[family]  # fmt: skip
    cfg = config_cls(**shape, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the dtype: no fp32 copy of the experts on the way
    try:
        return model_cls(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def with_linears(model: torch.nn.Module, enabled: bool, impl: str = "moekit"):
    """A ``time_generate`` variant: ``model``'s experts on ``impl`` and its plain linears on moekit's inference
    kernels (``enabled``) or torch's."""
    from moekit.experts import linears_for_inference

    experts = experts_as(model, impl)

    def prepare() -> torch.nn.Module:
        return linears_for_inference(experts(), enabled)

    return prepare


def run(family: str, shape: dict, args) -> list[dict]:
    from moekit.experts import to_huge_pages

    import moekit.integrations.hf  # noqa: F401  (registers moekit, moekit_packed)

    dtype = DTYPES[args.dtype]
    model = build(family, shape, args.layers, args.vocab, dtype)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    variants = {impl: with_linears(model, False, impl) for impl in IMPLS}
    variants["moekit_linears"] = with_linears(model, True)
    moved = None
    if not args.no_huge_pages:
        huge = copy.deepcopy(model)
        moved = to_huge_pages(huge, min_bytes=1 if args.quick else 2 << 20).__dict__
        variants["moekit_huge_pages"] = with_linears(huge, False)
        variants["moekit_linears_huge_pages"] = with_linears(huge, True)
    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    clock = time.process_time if args.threads == 1 else time.perf_counter
    best, outputs = time_generate(variants, ids, args.new_tokens, args.rounds, clock)
    hf = max(args.new_tokens / best[impl] for impl in ("eager", "grouped_mm"))
    rows = []
    for name in variants:
        rate = args.new_tokens / best[name]
        rows.append({"model": family, "variant": name, "tokens_per_s": rate, "over_best_transformers": rate / hf,
                     "same_tokens_as_eager": bool(torch.equal(outputs[name], outputs["eager"])), "best_s": best[name]})  # fmt: skip
        print(f"{family} {name}: {rate:.2f} tokens/s ({rate / hf:.2f}x the best transformers implementation)",
              file=sys.stderr, flush=True)  # fmt: skip
    return [{**r, "parameter_bytes": params, "moved_to_huge_pages": moved} for r in rows]


def markdown(res: dict) -> str:
    a, env = res["args"], res["environment"]
    lines = [f"Greedy `generate`, {a['new_tokens']} new tokens after a {a['prompt']}-token prompt, {a['layers']} decoder layers "
             f"of each model's shape, vocabulary {a['vocab']}, random weights, {a['dtype']}, {a['threads']} thread(s), best of "
             f"{a['rounds']} interleaved rounds ({'process CPU' if a['threads'] == 1 else 'wall'} time); torch {env['torch']}, "
             f"transformers {env['transformers']}; transparent huge pages: {env['pages']['transparent_hugepage']}.",
             "", "| model | variant | tokens/s | x best transformers | same tokens as eager |", "|---|---|---|---|---|"]  # fmt: skip
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:.2f} | {r['over_best_transformers']:.2f}x | "
                     f"{'yes' if r['same_tokens_as_eager'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weights' dtype (default bf16)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (best kept; default 3)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--no-huge-pages", action="store_true", help="leave out the to_huge_pages copy")
    ap.add_argument("--quick", action="store_true", help="a tiny Qwen3-MoE (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    for flag in ("layers", "vocab", "prompt", "new_tokens", "rounds", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    models = QUICK if args.quick else {m: MODELS[m] for m in args.models.split(",") if m in MODELS}
    if not args.quick and (unknown := [m for m in args.models.split(",") if m not in MODELS]):
        ap.error(f"--models has unknown names {unknown}; choose from {list(MODELS)}")
    if not args.no_huge_pages:
        require_huge_pages(ap, "the to_huge_pages variants (--no-huge-pages leaves them out)")
    torch.set_num_threads(args.threads)
    import transformers

    from moekit.reporting import environment

    env = {**environment(), "transformers": transformers.__version__, "command": " ".join(sys.argv), "pages": page_backing()}
    rows = [row for family, shape in models.items() for row in run(family, shape, args)]
    res = {"environment": env, "args": vars(args), "rows": rows, "load_average": os.getloadavg()}
    tag = "bench_generate" + ("_quick" if args.quick else "") + (f"_{args.dtype}" if args.dtype != "bf16" else "")
    tag += (f"_{args.layers}layers" if args.layers != 4 else "") + (f"_{args.threads}threads" if args.threads != 1 else "")
    out = Path(args.out)
    save(out, tag, res, markdown(res))


if __name__ == "__main__":
    main()
