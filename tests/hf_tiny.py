"""Tiny Hugging Face MoE models of every supported family, built from a config (no downloads).

Shared by tests/test_hf_families.py, tests/test_hf_merge.py and tests/test_cli_merge.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FAMILY_NAMES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers", "minimax", "flex_olmo", "deepseek_v2",
    "deepseek_v3", "glm4_moe", "dots1", "gpt_oss", "granitemoe", "granitemoeshared", "phimoe", "ernie4_5_moe",
    "hunyuan_v1_moe",
)  # fmt: skip
#: the families added by one small adapter file each, beyond the first five
DECODER_FAMILIES = tuple(f for f in FAMILY_NAMES if f != "switch_transformers")
#: config classes and LM classes (transformers names)
CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration"),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM"),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "dots1": ("Dots1Config", "Dots1ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM"),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM"),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM"),
}
#: MLA attention of the DeepSeek family (num_key_value_heads must equal num_attention_heads)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
           v_head_dim=8, head_dim=4)  # fmt: skip
#: per-family settings beyond DECODER_ONLY (the first layer dense where the family has dense layers)
EXTRA = {
    "minimax": dict(intermediate_size=48, num_local_experts=None, layer_types=["full_attention", "full_attention"],
                    head_dim=8),
    "flex_olmo": dict(intermediate_size=48, num_experts=None),
    "deepseek_v2": dict(MLA, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=None, n_shared_experts=1,
                        first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        routed_scaling_factor=1.5),
    "deepseek_v3": dict(MLA, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=None, n_shared_experts=1,
                        first_k_dense_replace=0, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=None, n_shared_experts=1,
                     first_k_dense_replace=0, n_group=1, topk_group=1, routed_scaling_factor=1.0, head_dim=8),
    "dots1": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=None, n_shared_experts=1,
                  first_k_dense_replace=0, n_group=1, topk_group=1, routed_scaling_factor=1.0, head_dim=8),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=None, head_dim=8, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=8),
    "granitemoe": dict(intermediate_size=24, num_local_experts=None),
    "granitemoeshared": dict(intermediate_size=24, num_local_experts=None, shared_intermediate_size=16),
    "phimoe": dict(intermediate_size=24, num_local_experts=None),
    "ernie4_5_moe": dict(intermediate_size=64, moe_intermediate_size=24, moe_num_experts=None, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=1, head_dim=8),
    "hunyuan_v1_moe": dict(intermediate_size=24, num_experts=None, moe_topk=2, head_dim=8, use_qk_norm=True),
}
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
    if family in EXTRA:
        cfg_cls = getattr(tf, CLASSES[family][0])
        kw = {k: (experts if v is None else v) for k, v in EXTRA[family].items()}
        return cfg_cls(**{**DECODER_ONLY, **kw, **overrides})
    if family == "switch_transformers":
        kw = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                  encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)  # fmt: skip
        return tf.SwitchTransformersConfig(**{**kw, "num_experts": experts, **overrides})
    raise ValueError(family)


def model_class(family: str) -> type:
    import transformers as tf

    return getattr(tf, CLASSES[family][1])


def tiny_model(family: str, *, seed: int = 0, **config_overrides: object) -> nn.Module:
    """A randomly initialised tiny model in eval mode. Routers are re-drawn with a larger scale so that
    routing is not nearly uniform (several families initialise router weights to zero), and routing
    biases (selection biases, router biases) get random values so that round trips check them."""
    torch.manual_seed(seed)
    model = model_class(family)(tiny_config(family, **config_overrides)).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("mlp.gate.weight", "router.classifier.weight", "router.weight", "gate.wg.weight")):
                t.normal_(0.0, 0.5)
            elif name.endswith(("e_score_correction_bias", "router.bias")):
                t.normal_(0.0, 0.1)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")) and not bool(t.abs().sum()):
                t.normal_(0.0, 0.1)  # Llama-4-style zero inits
            elif name.endswith("_proj_bias"):
                t.normal_(0.0, 0.1)
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
