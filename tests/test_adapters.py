"""Routed adapters inserted into existing models (moekit and Hugging Face), saved and reloaded."""

import pytest
import torch
from torch import nn

import moekit
from moekit.layers.adapters import adapter_context, adapter_sites, insert_routed_adapters, load_adapters, save_adapters

transformers = pytest.importorskip("transformers")


def _bert():
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                                                         d_kv=16, vocab_size=100))


HF = {
    "bert": (_bert, r"encoder\.layer\.\d+$", 2),
    "gpt2": (_gpt2, r"transformer\.h\.\d+$", 2),
    "t5": (_t5, r"(encoder|decoder)\.block\.\d+$", 4),
}


def _run(model, name, ids, mask):
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        kwargs["decoder_input_ids"] = ids[:, :4]
    with adapter_context(model, mask=mask):
        return model(**kwargs).to_tuple()[0]


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("method", ["smear", "top1"])
def test_insert_train_save_reload_hf(name: str, method: str, tmp_path) -> None:
    make, pattern, n_sites = HF[name]
    torch.manual_seed(0)
    model = make()
    backbone_params = sum(p.numel() for p in model.parameters())
    insert_routed_adapters(model, pattern, method=method, num_experts=4, bottleneck=8)
    assert len(adapter_sites(model)) == n_sites
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.moekit_adapters.parameters())
    assert sum(p.numel() for p in model.parameters()) > backbone_params
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    # one optimisation step changes the adapters only
    opt = torch.optim.Adam(trainable, lr=1e-2)
    _run(model, name, ids, mask).square().mean().backward()
    opt.step()
    model.eval()
    out = _run(model, name, ids, mask)
    save_adapters(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapters.safetensors", "adapters.json"}
    assert (tmp_path / "ad" / "adapters.safetensors").stat().st_size < 4 * sum(p.numel() for p in trainable) + 10_000
    torch.manual_seed(0)
    fresh = make().eval()
    load_adapters(fresh, tmp_path / "ad")
    torch.testing.assert_close(_run(fresh, name, ids, mask), out)


def test_padding_is_masked_out_of_routing() -> None:
    torch.manual_seed(0)
    model = insert_routed_adapters(_bert().eval(), r"encoder\.layer\.0$", num_experts=4, bottleneck=8,
                                   router_kwargs={"init_std": 1.0})
    ids = torch.randint(0, 100, (1, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    decisions = []
    router = adapter_sites(model)["encoder.layer.0"].router
    handle = router.register_forward_hook(lambda m, i, o: decisions.append(o.probs_TE))
    _run(model, "bert", ids, mask)
    ids2 = ids.clone()
    ids2[0, 5:] = (ids2[0, 5:] + 1) % 100  # change only padding tokens
    _run(model, "bert", ids2, mask)
    handle.remove()
    torch.testing.assert_close(decisions[0], decisions[1])


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


def test_insert_by_type_into_a_cnn_with_tag_routing(tmp_path) -> None:
    model = insert_routed_adapters(TinyCNN(), nn.Sequential, method="tag", num_experts=3, bottleneck=4, dim=8)
    assert set(adapter_sites(model)) == {"block1", "block2"}
    with adapter_context(model, meta={"tag": torch.tensor([0, 2])}):
        y = model(torch.randn(2, 1, 6, 6))
    assert y.shape == (2, 3)


def test_insert_into_moekit_classifier() -> None:
    from moekit.models.classifier import MoEClassifier

    model = MoEClassifier(10, 3, dim=16)
    insert_routed_adapters(model, r"^embed$", method="smear", num_experts=2, bottleneck=4)
    logits, _ = model(torch.randn(5, 10))
    assert logits.shape == (5, 3)


def test_failed_insertion_changes_nothing() -> None:
    model = _bert()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matches no module"):
        insert_routed_adapters(model, r"no\.such\.layer")
    with pytest.raises(ValueError, match="unknown routing method 'magic'"):
        insert_routed_adapters(model, r"encoder\.layer\.\d+$", method="magic")
    assert not hasattr(model, "moekit_adapters")
    cnn = TinyCNN()
    with pytest.raises(ValueError, match="cannot infer the output width of site 'block1.1'"):
        insert_routed_adapters(cnn, r"^block\d\.\d$")  # conv sites infer, the ReLU does not
    assert not hasattr(cnn, "moekit_adapters")
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="adapters.json"):
        load_adapters(_bert(), tmp_path)
    model = insert_routed_adapters(_bert(), r"encoder\.layer\.\d+$", num_experts=2, bottleneck=4)
    save_adapters(model, tmp_path / "ok")
    (tmp_path / "ok" / "adapters.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt adapter files"):
        load_adapters(_bert(), tmp_path / "ok")
