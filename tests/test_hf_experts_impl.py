"""moekit's dispatch registered as a transformers experts implementation: ``experts_implementation="moekit"``
(and ``"moekit_packed"``) gives the outputs, gradients and generations of ``eager`` on tiny configs of every
family with a registry-aware experts class we test, GPT-OSS's transposed + biased + interleaved layout included."""

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import tiny_model  # noqa: E402

import moekit.integrations.hf  # noqa: E402,F401  (registers the implementations)
from moekit.integrations.hf.experts_impl import IMPLEMENTATIONS, register_experts_implementation  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]


def _model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if family != "gpt_oss":
        return tiny_model(family).to(dtype)
    cfg = transformers.GptOssConfig(vocab_size=256, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=6,
                                    num_experts_per_tok=2, max_position_embeddings=64, sliding_window=16,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.2)  # biases included: zeros would not test them
    return model.to(dtype)


def _logits(model, ids, impl: str) -> torch.Tensor:
    model.set_experts_implementation(impl)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_moekit_implementations_equal_eager(family: str) -> None:
    model = _model(family)
    ids = torch.randint(3, 256, (2, 9))
    ref = _logits(model, ids, "eager")
    for impl in IMPLEMENTATIONS:
        torch.testing.assert_close(_logits(model, ids, impl), ref, rtol=1e-5, atol=1e-5)
        assert model.config._experts_implementation == impl


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bf16_equals_eager(family: str) -> None:
    model = _model(family, torch.bfloat16)
    ids = torch.randint(3, 256, (2, 9))
    ref = _logits(model, ids, "eager").float()
    for impl in IMPLEMENTATIONS:
        got = _logits(model, ids, impl).float()
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_training_gradients_equal_eager(family: str) -> None:
    model = _model(family).train()
    ids = torch.randint(3, 256, (2, 9))
    grads = {}
    for impl in ("eager", "moekit"):
        model.zero_grad(set_to_none=True)
        model.set_experts_implementation(impl)
        model(ids, labels=ids).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["moekit"].keys() == grads["eager"].keys()
    assert any("experts" in n for n in grads["moekit"])
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads["moekit"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_from_pretrained_selects_moekit_and_generates_like_eager(tmp_path) -> None:
    model = _model("qwen3_moe")
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 256, (1, 5))
    loaded = {impl: transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).eval()
              for impl in ("eager", "moekit", "moekit_packed")}  # fmt: skip
    out = {impl: m.generate(ids, max_new_tokens=6, do_sample=False) for impl, m in loaded.items()}
    assert loaded["moekit"].config._experts_implementation == "moekit"
    assert torch.equal(out["moekit"], out["eager"]) and torch.equal(out["moekit_packed"], out["eager"])


def test_expert_parallel_modules_fall_back_to_eager() -> None:
    model = _model("mixtral")
    ids = torch.randint(3, 256, (2, 9))
    ref = _logits(model, ids, "eager")
    for module in model.modules():
        if hasattr(module, "_is_expert_parallel"):
            module._is_expert_parallel = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _logits(model, ids, "moekit")
    assert any("expert-parallel" in str(w.message) for w in caught)
    torch.testing.assert_close(got, ref)


def test_registration_is_idempotent_and_lazy() -> None:
    assert register_experts_implementation() == IMPLEMENTATIONS
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert set(IMPLEMENTATIONS) <= set(ALL_EXPERTS_FUNCTIONS.keys())
    code = "import sys, moekit; assert 'transformers' not in sys.modules, 'import moekit imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_equals_eager_on_the_one_call_layer(family: str) -> None:
    """One token through each experts module (the decode step): plain two-matrix families run the one-call
    native layer (``ffn_weights`` is their matrices); GPT-OSS's clamped, interleaved gate has no such form and
    keeps the expert loop. Both equal eager."""
    from moekit.experts import native_gemv
    from moekit.integrations.hf.experts_impl import _bank, moekit_experts_forward

    model = _model(family)
    experts = [m for m in model.modules() if hasattr(m, "_apply_gate") and hasattr(m, "down_proj")]
    assert experts
    for module in experts:
        ffn = _bank(module, packed=False).ffn_weights()
        assert (ffn is None) == (family == "gpt_oss")
        x = torch.randn(1, module.down_proj.shape[-1] if module.is_transposed else module.down_proj.shape[1])
        E = _bank(module, packed=False).num_experts
        ids, w = torch.randperm(E)[:2].unsqueeze(0), torch.softmax(torch.randn(1, 2), -1)
        with torch.no_grad():
            eager = type(module).forward.__wrapped__(module, x, ids, w)
            got = moekit_experts_forward(module, x, ids, w)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert ffn is None or native_gemv.FFN_ACTIVATIONS.get(ffn.activation) is not None
