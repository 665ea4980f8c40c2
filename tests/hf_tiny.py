"""Tiny Hugging Face MoE models of every supported family, built from a config (no downloads).

Shared by tests/test_hf_families.py, tests/test_hf_merge.py and tests/test_cli_merge.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers")
NUM_EXPERTS = 6
VOCAB = 256
DECODER_ONLY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0, bos_token_id=2,
)  # fmt: skip


def tiny_config(family: str, *, experts: int = NUM_EXPERTS, **overrides: object):
    """A tiny config of ``family`` (hidden 32, 2 layers / 2+2 for Switch, ``experts`` experts)."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**{**DECODER_ONLY, "intermediate_size": 48, "num_local_experts": experts, **overrides})
    if family == "qwen2_moe":
        kw = {"intermediate_size": 64, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40}
        return tf.Qwen2MoeConfig(**{**DECODER_ONLY, **kw, "num_experts": experts, **overrides})
    if family == "qwen3_moe":
        kw = {"intermediate_size": 64, "moe_intermediate_size": 24, "head_dim": 8, "norm_topk_prob": True}
        return tf.Qwen3MoeConfig(**{**DECODER_ONLY, **kw, "num_experts": experts, **overrides})
    if family == "olmoe":
        return tf.OlmoeConfig(**{**DECODER_ONLY, "intermediate_size": 48, "num_experts": experts, **overrides})
    if family == "switch_transformers":
        kw = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                  encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)  # fmt: skip
        return tf.SwitchTransformersConfig(**{**kw, "num_experts": experts, **overrides})
    raise ValueError(family)


def model_class(family: str) -> type:
    import transformers as tf

    return {
        "mixtral": tf.MixtralForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "olmoe": tf.OlmoeForCausalLM,
        "switch_transformers": tf.SwitchTransformersForConditionalGeneration,
    }[family]


def tiny_model(family: str, *, seed: int = 0, **config_overrides: object) -> nn.Module:
    """A randomly initialised tiny model in eval mode. Routers are re-drawn with a larger scale so that
    routing is not nearly uniform (Qwen2-MoE/OLMoE initialise router weights to zero)."""
    torch.manual_seed(seed)
    model = model_class(family)(tiny_config(family, **config_overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.classifier.weight")):
                p.normal_(0.0, 0.5)
    return model


def logits(model: nn.Module, ids_BS: Tensor) -> Tensor:
    """Forward logits (Switch: decoder input = ids shifted right)."""
    if model.config.model_type == "switch_transformers":
        return model(input_ids=ids_BS, labels=ids_BS).logits
    return model(input_ids=ids_BS).logits


def generate(model: nn.Module, ids_BS: Tensor, new_tokens: int = 4) -> Tensor:
    return model.generate(input_ids=ids_BS, max_new_tokens=new_tokens, do_sample=False)


def token_batches(count: int = 3, batch: int = 4, seq: int = 16, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=g) for _ in range(count)]
