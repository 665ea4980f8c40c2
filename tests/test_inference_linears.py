"""linears_for_inference: plain nn.Linear layers on moekit's inference kernels when no gradient is needed."""

import copy
import io

import pytest
import torch
from torch import nn

from moekit.experts import linears_for_inference, native_gemv
from moekit.experts.inference import InferenceLinear

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


class LoRALinear(nn.Linear):
    """A subclass with its own forward: left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96,), (1, 96), (3, 96), (2, 5, 96), (70, 96), (0, 96), (2, 0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_match_f_linear(dtype: torch.dtype, shape: tuple, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 130, bias=bias).to(dtype)
    x = torch.randn(*shape).to(dtype)
    with torch.inference_mode():
        ref = nn.functional.linear(x, lin.weight, lin.bias)
        linears_for_inference(lin)
        y = lin(x)
    assert type(lin) is InferenceLinear and y.shape == ref.shape and y.dtype == dtype
    assert ref.numel() == 0 or _rel(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_native_kernel_takes_the_rows_it_serves(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense layer takes the seam's crossover: the native GEMV exactly where ``native_gemv.serves`` the rows
    (decode; past MAX_ROWS torch's kernels or the widened blocks), and never under autograd."""
    if dtype not in native_gemv.dtypes():
        pytest.skip(f"this build has no {dtype} products")
    calls = []
    real = native_gemv.linear
    monkeypatch.setattr(native_gemv, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin = linears_for_inference(nn.Linear(256, 64).to(dtype))
    for rows in (1, 65, 1025):
        calls.clear()
        x = torch.randn(rows, 256).to(dtype)
        with torch.no_grad():
            y = lin(x)
        assert bool(calls) == native_gemv.serves(rows, dtype, 256), rows
        assert _rel(y, nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())) <= 1e-2
    calls.clear()
    lin.float()(torch.randn(1, 256))  # gradients wanted: F.linear
    assert not calls


def test_training_is_unchanged() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    fast = linears_for_inference(copy.deepcopy(plain))
    x = torch.randn(4, 64)
    plain(x).square().sum().backward()
    fast(x).square().sum().backward()
    for p, q in zip(plain.parameters(), fast.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast: torch's own casts
        assert fast(x).dtype == torch.bfloat16


def test_switches_only_plain_linears_and_turns_back() -> None:
    m = nn.Sequential(nn.Linear(8, 8), LoRALinear(8, 8), nn.Conv1d(2, 2, 1))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    linears_for_inference(m)
    assert [type(c) for c in m] == [InferenceLinear, LoRALinear, nn.Conv1d]
    assert isinstance(m[0], nn.Linear) and m.state_dict().keys() == state.keys()
    buf = io.BytesIO()
    torch.save(m, buf)  # the swapped class pickles (a module-level class)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)[0]) is InferenceLinear
    linears_for_inference(m, enabled=False)
    assert [type(c) for c in m] == [nn.Linear, LoRALinear, nn.Conv1d]
    with pytest.raises(ValueError, match="Conv1d has no nn.Linear"):
        linears_for_inference(nn.Conv1d(2, 2, 1))


def test_a_transformers_model_generates_the_same_tokens() -> None:
    tf = pytest.importorskip("transformers")
    cfg = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (1, 6))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        linears_for_inference(model)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref)
    assert type(model.lm_head) is InferenceLinear
