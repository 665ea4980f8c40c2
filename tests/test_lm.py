"""The byte-level MoE language model, its training loop, the remapped layer, and the stdlib corpus."""

import math

import pytest
import torch

import moekit
from moekit.data.stdlib_corpus import eval_windows, load_stdlib_corpus, random_windows, stdlib_files, stdlib_root
from moekit.layers.remap import RemappedMoE
from moekit.merging import compress_experts, pack_compressed
from moekit.merging.recovery import recover
from moekit.models.lm import lm_loss
from moekit.models.lm_train import distillation_loss, evaluate_bpb, train_lm
from moekit.registry import MODELS


def _lm(**kw: object) -> moekit.MoELM:
    return moekit.MoELM(**{"dim": 16, "depth": 2, "heads": 2, "max_seq_len": 16, "num_experts": 4, "hidden": 32, **kw})


@pytest.mark.parametrize("experts", ["glu", "mlp"])
def test_forward_shapes_and_causality(experts: str) -> None:
    model = _lm(experts=experts).eval()
    x = torch.randint(0, 256, (3, 16))
    logits, outputs = model(x)
    assert logits.shape == (3, 16, 256) and len(outputs) == 2
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(y)[0][:, :10], logits[:, :10].detach())
    with pytest.raises(ValueError, match=r"tokens must be \[B, S<=16\]"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_rebuilds_the_model() -> None:
    model = _lm(experts_per_layer=[2, 4], router_outputs_per_layer=[4, 4])
    assert isinstance(model.blocks[0].moe, RemappedMoE) and isinstance(model.blocks[1].moe, moekit.MoE)
    rebuilt = MODELS.create("moe_lm", **model.config())
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in model.named_parameters()]
    rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="more experts"):
        _lm(experts_per_layer=[4, 4], router_outputs_per_layer=[2, 4])
    with pytest.raises(ValueError, match="experts_per_layer must be 2 ints"):
        _lm(experts_per_layer=[4])


def test_config_describes_compressed_layers() -> None:
    model = compress_experts(_lm(experts_per_layer=[2, 4], router_outputs_per_layer=[4, 4]), 4)
    with torch.no_grad():
        model.blocks[1].moe.experts.down_proj_mask[:, 3:] = 0
    packed = pack_compressed(model)
    cfg = packed.config()
    assert cfg["compressed"][0] == {"rank": 4, "kept_rows": {"gate_up_proj": [64, 64], "down_proj": [16, 16]}}
    assert cfg["compressed"][1]["kept_rows"]["down_proj"] == [3] * 4
    assert model.config()["compressed"] == [{"rank": 4, "kept_rows": None}] * 2
    for source in (model, packed):
        rebuilt = MODELS.create("moe_lm", **source.config())
        assert {n: t.shape for n, t in rebuilt.state_dict().items()} == {n: t.shape for n, t in source.state_dict().items()}
        rebuilt.load_state_dict(source.state_dict())
        assert type(rebuilt.blocks[0].moe) is type(source.blocks[0].moe)
    assert "compressed" not in _lm().config()
    with pytest.raises(ValueError, match=r"compressed must have one entry per layer \(2\), got 1"):
        _lm(compressed=[None])
    with pytest.raises(ValueError, match=r"compressed\[1\] must be None or"):
        _lm(compressed=[None, {"rank": 4}])
    with pytest.raises(ValueError, match=r"compressed\[0\]: rank must be"):
        _lm(compressed=[{"rank": 0, "kept_rows": None}, None])


def test_training_lowers_the_loss_and_bpb_is_cross_entropy_in_bits() -> None:
    model = _lm()
    data = torch.arange(17).repeat(4, 1) * 7 % 256
    losses = train_lm(model, lambda s: data, steps=30, lr=1e-2, aux_weights={"switch": 0.01}, quiet=True)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        ce = float(lm_loss(model(data[:, :-1])[0], data[:, 1:]))
    assert evaluate_bpb(model, data) == pytest.approx(ce / math.log(2), rel=1e-5)


def test_recovery_freezes_routers_and_distills() -> None:
    teacher, student = _lm().eval(), _lm()
    routers = {n: p.clone() for n, p in student.named_parameters() if ".router." in n}
    others = {n: p.clone() for n, p in student.named_parameters() if ".router." not in n}
    data = torch.randint(0, 256, (4, 17))
    recover(student, teacher, lambda s: data, steps=3, quiet=True)
    for n, p in student.named_parameters():
        assert p.requires_grad
        if n in routers:
            assert torch.equal(p, routers[n])
    assert any(not torch.equal(p, others[n]) for n, p in student.named_parameters() if n in others)
    logits = torch.randn(2, 3, 5)
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(2, 3, 5), 2.0)) > 0


def test_remapped_moe_validates_its_map() -> None:
    router, bank = moekit.TopKRouter(8, 4, 2), moekit.GLUExperts(2, 8, 8)
    with pytest.raises(ValueError, match=r"expert_map must be \[router.num_experts=4\] with values in \[0, 2\)"):
        RemappedMoE(router, bank, torch.tensor([0, 1, 2, 0]))
    layer = RemappedMoE(router, bank, torch.tensor([0, 1, 1, 0]))
    out = layer(torch.randn(5, 8))
    assert out.y.shape == (5, 8) and out.decision.num_experts == 4
    with pytest.raises(TypeError, match="input has dtype torch.float64 but experts have dtype torch.float32"):
        layer(torch.randn(5, 8, dtype=torch.float64))  # the same input checks as MoE
    with pytest.raises(ValueError, match="router has dim=8 but experts has dim=6"):
        RemappedMoE(router, moekit.GLUExperts(2, 6, 8), torch.tensor([0, 1, 1, 0]))


def test_stdlib_corpus_is_deterministic_split_by_file_and_capped() -> None:
    files = stdlib_files()
    assert files and all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert (stdlib_root() / "os.py").is_file()
    a, b = load_stdlib_corpus(max_bytes=60_000), load_stdlib_corpus(max_bytes=60_000)
    assert a.digest == b.digest and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.numel() + a.val.numel() <= 60_000 and a.val.numel() > 0 and a.val_files >= 1
    assert bytes(a.train[:2000].tolist()).decode("utf-8", errors="replace").count("\n") > 10  # real text
    gen = torch.Generator().manual_seed(0)
    w = random_windows(a.train, 3, 32, gen)
    assert w.shape == (3, 33) and w.dtype == torch.long
    ev = eval_windows(a.val, 32, 5)
    assert ev.shape[1] == 33 and 1 <= ev.shape[0] <= 5
    with pytest.raises(ValueError, match="max_bytes must be >= 1024"):
        load_stdlib_corpus(max_bytes=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stdlib_files("/no/such/dir")
