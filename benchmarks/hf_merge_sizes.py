"""Checkpoint size, parameters and merge time of M-SMoE on small Hugging Face MoE models (each family).

For every supported family a small randomly initialised model (8 experts per MoE block) is merged
to 4 experts per block (plain form, uniform) and to 4 on average (exact form, global budget) with
``method="mcsmoe"`` on stdlib calibration text (bytes % vocab), saved with ``save_pretrained`` and
reloaded (plain: stock ``from_pretrained``; exact: ``moekit.integrations.hf.load_hf_model``). The
reloaded model must reproduce the in-memory merged model's logits. Random weights say nothing about
quality; quality is measured on trained models by ``moekit reproduce mcsmoe``.

    python benchmarks/hf_merge_sizes.py            # writes benchmarks/results/hf_merge_sizes.{json,md}
    python benchmarks/hf_merge_sizes.py --quick    # tiny models
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "small": dict(hidden=256, ffn=512, layers=4, vocab=8192, experts=8),
    "quick": dict(hidden=32, ffn=48, layers=2, vocab=256, experts=8),
}


def build(family: str, s: dict):
    import transformers as tf

    H, F, L, V, E = s["hidden"], s["ffn"], s["layers"], s["vocab"], s["experts"]
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=8 if H >= 64 else 4,
                  num_key_value_heads=4 if H >= 64 else 2, max_position_embeddings=512, num_experts_per_tok=2,
                  eos_token_id=1, pad_token_id=0, bos_token_id=2)  # fmt: skip
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=F, num_local_experts=E))
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**common, intermediate_size=F, moe_intermediate_size=F // 2,
                                   shared_expert_intermediate_size=F, num_experts=E)  # fmt: skip
        model = tf.Qwen2MoeForCausalLM(config)
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, intermediate_size=F, moe_intermediate_size=F // 2, num_experts=E,
                                   head_dim=H // 8 if H >= 64 else 8, norm_topk_prob=True)  # fmt: skip
        model = tf.Qwen3MoeForCausalLM(config)
    elif family == "olmoe":
        model = tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, intermediate_size=F, num_experts=E))
    else:
        config = tf.SwitchTransformersConfig(vocab_size=V, d_model=H, d_kv=H // 8, d_ff=F, num_layers=L,
                                             num_decoder_layers=L, num_heads=8, num_experts=E, encoder_sparse_step=2,
                                             decoder_sparse_step=2, expert_capacity=64, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)  # fmt: skip
        model = tf.SwitchTransformersForConditionalGeneration(config)
    with torch.no_grad():  # routers that actually discriminate (Qwen2-MoE/OLMoE initialise them to zero)
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.classifier.weight")):
                p.normal_(0.0, 0.5)
    return model.eval()


def forward(model, ids):
    if model.config.model_type == "switch_transformers":
        return model(input_ids=ids, labels=ids).logits
    return model(input_ids=ids).logits


def weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def run(size: str, samples: int, seq_len: int) -> list[dict]:
    from moekit.data.calibration import byte_windows, read_calibration_bytes, to_batches
    from moekit.integrations.hf import family_for, load_hf_model, merge_hf_model, save_hf_model

    s = SIZES[size]
    text = read_calibration_bytes(["stdlib"])
    calib = to_batches(byte_windows(text, samples=samples, seq_len=seq_len, vocab_size=s["vocab"]), 8)
    probe = byte_windows(text[len(text) // 2 :], samples=2, seq_len=seq_len, vocab_size=s["vocab"])
    rows = []
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers"):
        torch.manual_seed(0)
        model = build(family, s)
        fam = family_for(model)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_model(model, Path(tmp) / "orig")
            row = {"family": family, "blocks": len(fam.moe_blocks(model)), "experts": s["experts"],
                   "params": sum(p.numel() for p in model.parameters()),
                   "bytes": weights_bytes(Path(tmp) / "orig")}  # fmt: skip
            for form in ("plain", "exact"):
                start = time.perf_counter()
                merged = merge_hf_model(model, calib, experts=s["experts"] // 2, form=form, quiet=True)
                seconds = time.perf_counter() - start
                save_hf_model(merged, Path(tmp) / form)
                if form == "plain":
                    reloaded = type(model).from_pretrained(Path(tmp) / form).eval()
                else:
                    reloaded = load_hf_model(Path(tmp) / form).eval()
                with torch.no_grad():
                    diff = (forward(reloaded, probe) - forward(merged, probe)).abs().max().item()
                counts = [fam.num_experts(b) for b in fam.moe_blocks(merged).values()]
                row[form] = {"params": sum(p.numel() for p in reloaded.parameters()),
                             "bytes": weights_bytes(Path(tmp) / form), "merge_s": round(seconds, 2),
                             "experts_per_block": counts, "reload_max_abs_diff": diff}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    return rows


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"M-SMoE (`mcsmoe`) on small random models ({meta['size']}: {meta['shape']}), calibration "
        f"{meta['samples']}x{meta['seq_len']} stdlib byte tokens; "
        f"torch {meta['torch']}, transformers {meta['transformers']}.",
        "",
        "| family | MoE blocks x E | params | weights | plain: experts/block | params | weights | merge s "
        "| exact: experts/block | params | weights | merge s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def cells(f: dict) -> str:
            share = f"{100.0 * f['params'] / r['params']:.0f}%"
            return f"{f['experts_per_block']} | {f['params'] / 1e6:.2f}M ({share}) | {mib(f['bytes'])} | {f['merge_s']}"

        lines.append(
            f"| {r['family']} | {r['blocks']} x {r['experts']} | {r['params'] / 1e6:.2f}M | {mib(r['bytes'])} "
            f"| {cells(r['plain'])} | {cells(r['exact'])} |"
        )
    worst = max(max(r["plain"]["reload_max_abs_diff"], r["exact"]["reload_max_abs_diff"]) for r in rows)
    lines += ["", f"Largest |logit| difference, reloaded checkpoint vs in-memory merged model: {worst:.1e}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    size = "quick" if args.quick else "small"
    samples, seq_len = (8, 32) if args.quick else (32, 128)
    rows = run(size, samples, seq_len)
    meta = {"size": size, "shape": SIZES[size], "samples": samples, "seq_len": seq_len, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "hf_merge_sizes" + ("_quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
