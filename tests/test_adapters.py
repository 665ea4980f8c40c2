"""Routed adapters inserted into existing models (moekit and Hugging Face), saved and reloaded."""

import pytest
import torch
from torch import nn

from moekit.layers.adapters import (
    adapter_context,
    adapter_sites,
    insert_routed_adapters,
    load_adapters,
    remove_adapters,
    save_adapters,
)

transformers = pytest.importorskip("transformers")
BIG_INIT = {"up_init_scale": 1.0}  # adapters that visibly change the model, for the tests


def _bert():
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100))  # fmt: skip


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))  # fmt: skip


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                                                         d_kv=16, vocab_size=100))  # fmt: skip


HF = {
    "bert": (_bert, r"encoder\.layer\.\d+$", 2),
    "gpt2": (_gpt2, r"transformer\.h\.\d+$", 2),
    "t5": (_t5, r"(encoder|decoder)\.block\.\d+$", 4),
}


def _run(model, name, ids, mask):
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        kwargs["decoder_input_ids"] = ids[:, :4]
    return model(**kwargs).to_tuple()[0]


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("method", ["smear", "top1"])
def test_insert_train_save_reload_hf(name: str, method: str, tmp_path) -> None:
    make, pattern, n_sites = HF[name]
    torch.manual_seed(0)
    model = make()
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    insert_routed_adapters(model, pattern, method=method, num_experts=4, bottleneck=8, bank_kwargs=BIG_INIT)
    assert len(adapter_sites(model)) == n_sites
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.moekit_adapters.parameters())
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    opt = torch.optim.Adam(trainable, lr=1e-2)
    _run(model, name, ids, mask).square().mean().backward()
    opt.step()
    for k, v in backbone.items():  # one optimisation step changed the adapters only
        torch.testing.assert_close(model.state_dict()[k], v)
    model.eval()
    out = _run(model, name, ids, mask)
    save_adapters(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapters.safetensors", "adapters.json"}
    assert (tmp_path / "ad" / "adapters.safetensors").stat().st_size < 4 * sum(p.numel() for p in trainable) + 10_000
    torch.manual_seed(0)
    fresh = make().eval()
    load_adapters(fresh, tmp_path / "ad")
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "moekit_adapters" not in n)
    torch.testing.assert_close(_run(fresh, name, ids, mask), out)
    remove_adapters(fresh)
    assert not torch.allclose(_run(fresh, name, ids, mask), out)


def test_causal_sites_are_detected_and_do_not_see_the_future() -> None:
    torch.manual_seed(0)
    gpt2 = insert_routed_adapters(_gpt2().eval(), r"transformer\.h\.\d+$", num_experts=4, bottleneck=8, segment_len=3,
                                  bank_kwargs=BIG_INIT, router_kwargs={"init_std": 1.0})  # fmt: skip
    assert all(b.segment_len == 3 for b in adapter_sites(gpt2).values())
    ids = torch.randint(0, 100, (2, 10))
    logits = gpt2(input_ids=ids).logits
    for p in (1, 4, 8):
        ids2 = ids.clone()
        ids2[:, p:] = (ids2[:, p:] + 7) % 100
        torch.testing.assert_close(gpt2(input_ids=ids2).logits[:, :p], logits[:, :p])
    t5 = insert_routed_adapters(_t5(), r"(encoder|decoder)\.block\.\d+$", num_experts=2, bottleneck=4)
    seg = {n: b.segment_len for n, b in adapter_sites(t5).items()}
    assert seg == {"encoder.block.0": None, "encoder.block.1": None, "decoder.block.0": 64, "decoder.block.1": 64}
    bert = insert_routed_adapters(_bert(), r"encoder\.layer\.\d+$", num_experts=2, bottleneck=4)
    assert all(b.segment_len is None for b in adapter_sites(bert).values())


def test_moekit_lm_gets_causal_adapters() -> None:
    from moekit.models.lm import MoELM

    lm = MoELM(dim=16, depth=2, heads=2, hidden=32, num_experts=2, k=1, max_seq_len=32).eval()
    insert_routed_adapters(lm, r"^blocks\.\d+$", num_experts=2, bottleneck=4, dim=16, segment_len=4,
                           bank_kwargs=BIG_INIT, router_kwargs={"init_std": 1.0})  # fmt: skip
    assert all(b.segment_len == 4 for b in adapter_sites(lm).values())
    tokens = torch.randint(0, 256, (2, 12))
    logits = lm(tokens)[0]
    tokens2 = tokens.clone()
    tokens2[:, 6:] = (tokens2[:, 6:] + 1) % 256
    torch.testing.assert_close(lm(tokens2)[0][:, :6], logits[:, :6])


def test_padding_mask_is_taken_from_the_call_and_masked_out_of_routing() -> None:
    torch.manual_seed(0)
    model = insert_routed_adapters(_bert().eval(), r"encoder\.layer\.0$", num_experts=4, bottleneck=8,
                                   router_kwargs={"init_std": 1.0})  # fmt: skip
    ids = torch.randint(0, 100, (1, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    ids2 = ids.clone()
    ids2[0, 5:] = (ids2[0, 5:] + 1) % 100  # change only padding tokens
    with adapter_context(model) as outs:
        model(input_ids=ids, attention_mask=mask)
        first = outs["encoder.layer.0"].decision.probs_TE
        model(input_ids=ids2, attention_mask=mask)
        second = outs["encoder.layer.0"].decision.probs_TE
        model(input_ids=ids2)  # no mask: the padding tokens now count
        unmasked = outs["encoder.layer.0"].decision.probs_TE
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, unmasked)


def test_t5_decoder_sites_use_the_decoder_mask() -> None:
    model = insert_routed_adapters(_t5().eval(), r"(en|de)coder\.block\.0$", num_experts=2, bottleneck=4, causal=False)
    seen = {}
    for site, block in adapter_sites(model).items():
        block.register_forward_pre_hook(lambda m, a, kw, site=site: seen.__setitem__(site, kw["mask"]), with_kwargs=True)
    ids, dec = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 5))  # equal lengths: shapes cannot tell
    enc_mask, dec_mask = torch.tensor([[1, 1, 0, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
    model(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec)
    assert torch.equal(seen["encoder.block.0"], enc_mask) and seen["decoder.block.0"] is None
    model(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert torch.equal(seen["decoder.block.0"], dec_mask)
    with adapter_context(model, mask=torch.ones(1, 5), decoder_mask=dec_mask):  # explicit masks win
        model(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec)
    assert torch.equal(seen["encoder.block.0"], torch.ones(1, 5)) and torch.equal(seen["decoder.block.0"], dec_mask)
    model(input_ids=ids, decoder_input_ids=dec)  # masks of an earlier call are not reused
    assert seen["encoder.block.0"] is None and seen["decoder.block.0"] is None


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


def test_insert_by_type_into_a_cnn_with_tag_routing_and_hash_tables_per_site(tmp_path) -> None:
    model = insert_routed_adapters(TinyCNN(), nn.Sequential, method="tag", num_experts=3, bottleneck=4, dim=8)
    assert set(adapter_sites(model)) == {"block1", "block2"}
    with adapter_context(model, meta={"tag": torch.tensor([0, 2])}) as outs:
        y = model(torch.randn(2, 1, 6, 6))
    assert y.shape == (2, 3) and outs["block2"].decision.ids_TK[:, 0].tolist() == [0, 2]
    hashed = insert_routed_adapters(TinyCNN(), nn.Sequential, method="hash", num_experts=8, bottleneck=4, dim=8,
                                    num_keys=100)  # fmt: skip
    tables = [b.router.table for b in adapter_sites(hashed).values()]
    assert not torch.equal(tables[0], tables[1])


def test_insert_into_moekit_classifier() -> None:
    from moekit.models.classifier import MoEClassifier

    model = MoEClassifier(10, 3, dim=16)
    insert_routed_adapters(model, r"^embed$", method="smear", num_experts=2, bottleneck=4)
    logits, _ = model(torch.randn(5, 10))
    assert logits.shape == (5, 3)


def test_failed_insertion_changes_nothing() -> None:
    model = _bert()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    n_modules = len(list(model.modules()))
    with pytest.raises(ValueError, match=r"sites='no\\\\.such\\\\.layer' matches no module of BertModel"):
        insert_routed_adapters(model, r"no\.such\.layer")
    with pytest.raises(ValueError, match="method must be one of .* got 'magic'"):
        insert_routed_adapters(model, r"encoder\.layer\.\d+$", method="magic")
    with pytest.raises(ValueError, match="method 'hash' needs num_keys"):
        insert_routed_adapters(model, r"encoder\.layer\.\d+$", method="hash")
    with pytest.raises(ValueError, match=r"sites \['encoder.nope'\] are not modules"):
        insert_routed_adapters(model, ["encoder.layer.0", "encoder.nope"])
    assert not hasattr(model, "moekit_adapters") and len(list(model.modules())) == n_modules
    assert model._forward_hooks == {} and model._forward_pre_hooks == {}
    cnn = TinyCNN()
    with pytest.raises(ValueError, match="cannot infer the output width of site 'block1.1'"):
        insert_routed_adapters(cnn, r"^block\d\.\d$")  # conv sites infer, the ReLU does not
    assert not hasattr(cnn, "moekit_adapters")
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}
    insert_routed_adapters(model, r"encoder\.layer\.0$", num_experts=2, bottleneck=4)
    with pytest.raises(ValueError, match="already has routed adapters"):
        insert_routed_adapters(model, r"encoder\.layer\.1$")


def test_bad_metadata_reaches_the_user_as_a_clear_error() -> None:
    model = insert_routed_adapters(_bert(), r"encoder\.layer\.0$", method="tag", num_experts=2, bottleneck=4)
    with pytest.raises(ValueError, match=r"meta\['tag'\] has 3 entries but the batch has 2"):
        with adapter_context(model, meta={"tag": torch.tensor([0, 1, 1])}):
            model(input_ids=torch.randint(0, 100, (2, 5)))
    with pytest.raises(ValueError, match="all-padding"):
        model(input_ids=torch.randint(0, 100, (2, 5)), attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0] * 5]))


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="adapters.safetensors not found"):
        load_adapters(_bert(), tmp_path)
    model = insert_routed_adapters(_bert(), r"encoder\.layer\.\d+$", num_experts=2, bottleneck=4)
    save_adapters(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="matches no module|are not modules"):
        load_adapters(_gpt2(), tmp_path / "ok")
    (tmp_path / "ok" / "adapters.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt adapter files"):
        load_adapters(_bert(), tmp_path / "ok")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_adapters(model, tmp_path / "file")


def test_sequential_backbone_runs_adapters_from_hooks_only(tmp_path) -> None:
    def backbone() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    x = torch.randn(5, 6)
    plain = backbone()
    model = insert_routed_adapters(backbone(), nn.Linear, method="smear", num_experts=3, bottleneck=4,
                                   bank_kwargs=BIG_INIT)  # fmt: skip
    assert isinstance(model, nn.Sequential) and len(model) == 5 and len(list(model)) == 5
    y = model(x)
    assert y.shape == (5, 3) and not torch.allclose(y, plain(x))
    y.sum().backward()
    assert all(p.grad is None for p in plain.parameters())
    save_adapters(model, tmp_path / "ad")
    fresh = load_adapters(backbone(), tmp_path / "ad")
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    remove_adapters(model)
    assert type(model) is nn.Sequential and len(model) == 5
    torch.testing.assert_close(model(x), plain(x))


def _bert_classifier() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def test_task_head_stays_trainable_is_saved_and_reloads_to_identical_logits(tmp_path) -> None:
    model = _bert_classifier()
    insert_routed_adapters(model, r"encoder\.layer\.\d+$", method="smear", num_experts=2, bottleneck=4)
    head = {n for n, p in model.named_parameters() if p.requires_grad and "moekit_adapters" not in n}
    assert head == {"classifier.weight", "classifier.bias"}  # BERT's own weights stay frozen
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 100, (12, 6), generator=g), torch.arange(12) % 3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the head learns (it was frozen at loss ln 3 before)
    model.eval()
    logits = model(input_ids=ids).logits
    save_adapters(model, tmp_path / "ad")
    fresh = load_adapters(_bert_classifier().eval(), tmp_path / "ad")
    assert {n for n, p in fresh.named_parameters() if p.requires_grad and "moekit_adapters" not in n} == head
    assert torch.equal(fresh(input_ids=ids).logits, logits)


def test_train_names_modules_and_hand_unfrozen_tensors_are_saved(tmp_path) -> None:
    model = _bert_classifier()
    with pytest.raises(ValueError, match=r"train names \['clasifier'\].*top-level modules: bert, dropout, classifier"):
        insert_routed_adapters(model, r"encoder\.layer\.0$", train=["clasifier"])
    with pytest.raises(TypeError, match=r"use \['classifier'\]"):
        insert_routed_adapters(model, r"encoder\.layer\.0$", train="classifier")
    insert_routed_adapters(model, r"encoder\.layer\.0$", num_experts=2, bottleneck=4, train=[])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "moekit_adapters" not in n)
    model.bert.pooler.dense.bias.requires_grad_(True)  # unfrozen by hand after insertion
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(0.5)
    model.eval()
    ids = torch.randint(0, 100, (2, 5))
    save_adapters(model, tmp_path / "ad")
    fresh = load_adapters(_bert_classifier().eval(), tmp_path / "ad")
    assert [n for n, p in fresh.named_parameters() if p.requires_grad and "moekit_adapters" not in n] == [
        "bert.pooler.dense.bias"
    ]
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
