"""moekit checkpoints: round trip, merged checkpoints smaller and reloading at reduced size, bad files."""

import json
from pathlib import Path

import pytest
import torch

import moekit
from moekit import checkpoint as ckpt
from moekit.checkpoint import load_checkpoint, save_checkpoint
from moekit.merging import merge_moekit_model


def _model() -> moekit.MoELM:
    return moekit.MoELM(dim=16, depth=2, heads=2, max_seq_len=16, num_experts=8, k=2, hidden=32).eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def test_round_trip(tmp_path: Path) -> None:
    model, x = _model(), torch.randint(0, 256, (2, 16))
    path = save_checkpoint(model, tmp_path / "full")
    assert sorted(p.name for p in path.iterdir()) == [".moekit-output.json", "config.json", "model.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["model"] == "moe_lm" and meta["format"] == "moekit"
    torch.testing.assert_close(_logits(load_checkpoint(path), x), _logits(model, x))


@pytest.mark.parametrize("form", ["exact", "plain"])
def test_merged_checkpoint_is_smaller_and_reloads_at_reduced_size(tmp_path: Path, form: str) -> None:
    model, x = _model(), torch.randint(0, 256, (4, 16))
    merged = merge_moekit_model(model, [x], experts=2, form=form, quiet=True)
    full_dir = save_checkpoint(model, tmp_path / "full")
    merged_dir = save_checkpoint(merged, tmp_path / form)
    full_bytes = (full_dir / ckpt.WEIGHTS_NAME).stat().st_size
    merged_bytes = (merged_dir / ckpt.WEIGHTS_NAME).stat().st_size
    reloaded = load_checkpoint(merged_dir)
    n_full = sum(p.numel() for p in model.parameters())
    n_merged = sum(p.numel() for p in reloaded.parameters())
    assert n_merged == sum(p.numel() for p in merged.parameters()) < n_full
    per_expert = sum(p[0].numel() for p in model.blocks[0].moe.experts.parameters())
    assert n_full - n_merged >= 12 * per_expert  # 16 -> 4 experts in all (plain also drops router rows)
    assert merged_bytes <= full_bytes - 4 * (n_full - n_merged) + 1024  # the file shrinks by the removed fp32 weights
    assert reloaded.config()["experts_per_layer"] == [b.moe.experts.num_experts for b in merged.blocks]
    assert sum(reloaded.config()["experts_per_layer"]) == 4
    torch.testing.assert_close(_logits(reloaded, x), _logits(merged, x))
    if form == "exact":
        assert isinstance(reloaded.blocks[0].moe, moekit.RemappedMoE)
        assert torch.equal(reloaded.blocks[0].moe.expert_map, merged.blocks[0].moe.expert_map)


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(model, tmp_path / "out")
    save_checkpoint(_model(), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(_model(), tmp_path / "c")
    weights, config = path / ckpt.WEIGHTS_NAME, path / ckpt.CONFIG_NAME
    good_weights, good_config = weights.read_bytes(), config.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint weights .*model.safetensors"):
        load_checkpoint(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_checkpoint(path)
    weights.write_bytes(good_weights)

    config.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint config"):
        load_checkpoint(path)
    config.write_text(json.dumps({"format": "moekit", "model": "no_such_model", "config": {}}))
    with pytest.raises(ValueError, match="names model 'no_such_model', which is not registered.*register_model"):
        load_checkpoint(path)
    meta = json.loads(good_config)
    meta["config"]["hidden"] = 64
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"do not match its config \('moe_lm'\): tensors of another shape .*down_proj \(found \[8, 16, 32\], expected \[8, 16, 64\]\)"):
        load_checkpoint(path)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_checkpoint(path)


class _UserNet(torch.nn.Module):
    """A user's own model: a moekit MoE inside, not registered anywhere."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.width = width
        self.inp = torch.nn.Linear(5, width)
        self.moe = moekit.MoE(moekit.TopKRouter(width, 4, k=2), moekit.MLPExperts(4, width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.inp(x)).y


def test_unregistered_model_saves_weights_and_loads_into_an_instance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _UserNet().eval(), torch.randn(3, 5)
    path = save_checkpoint(model, tmp_path / "user")
    meta = json.loads((path / "config.json").read_text())
    assert meta["model"] is None and meta["class"].endswith("_UserNet")
    with pytest.raises(ValueError, match=r"load_checkpoint\(path, model=_UserNet\(...\)\).*@moekit.register_model"):
        load_checkpoint(path)
    fresh = _UserNet().eval()
    assert load_checkpoint(path, model=fresh) is fresh
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(ValueError, match="do not match the model you passed"):
        load_checkpoint(path, model=_UserNet(width=8))


def test_register_model_decorator_rebuilds_by_name(tmp_path: Path) -> None:
    from moekit.registry import MODELS

    @moekit.register_model("test_user_net")
    class RegisteredNet(_UserNet):
        def config(self) -> dict:
            return {"width": self.width}

    try:
        torch.manual_seed(0)
        model, x = RegisteredNet(width=10).eval(), torch.randn(3, 5)
        path = save_checkpoint(model, tmp_path / "reg")
        loaded = load_checkpoint(path).eval()
        assert type(loaded) is RegisteredNet and loaded.width == 10
        torch.testing.assert_close(loaded(x), model(x))
    finally:
        MODELS._entries.pop("test_user_net")


def test_classifier_config_round_trip_with_a_balancer_by_name(tmp_path: Path) -> None:
    from moekit.models.classifier import MoEClassifier

    torch.manual_seed(0)
    model = MoEClassifier(6, 3, dim=8, num_experts=4, router_kwargs={"k": 2}, balancer="aux_free",
                          balancer_kwargs={"rate": 0.1})  # fmt: skip
    model.train()
    model(torch.randn(16, 6))  # the balancer's bias moves in training
    model.eval()
    x = torch.randn(4, 6)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "clf")).eval()
    assert isinstance(loaded.blocks[0].router.balancer, moekit.AuxFreeBias)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="balancer='aux_free'"):
        MoEClassifier(6, 3, router_kwargs={"balancer": moekit.AuxFreeBias(8)}).config()


def test_distributed_checkpoint_through_the_same_entry_point(tmp_path: Path) -> None:
    from moekit.distributed import save_distributed_checkpoint
    from moekit.distributed.model import ep_moe_classifier

    config = {"in_dim": 6, "num_classes": 3, "dim": 8, "num_experts": 4, "aux_free_rate": 0.01}
    torch.manual_seed(0)
    model, x = ep_moe_classifier(**config).eval(), torch.randn(4, 6)
    save_distributed_checkpoint(model, tmp_path / "ep", name="ep_moe_classifier", config=config)
    torch.testing.assert_close(load_checkpoint(tmp_path / "ep").eval()(x)[0], model(x)[0])
    fresh = ep_moe_classifier(**config).eval()
    torch.testing.assert_close(load_checkpoint(tmp_path / "ep", model=fresh)(x)[0], model(x)[0])


def test_model_with_routed_adapters_and_a_trained_head(tmp_path: Path) -> None:
    from moekit.models.resnet_moe import BasicBlock

    def backbone() -> moekit.ResNetMoE:
        torch.manual_seed(0)
        return moekit.ResNetMoE(3, in_channels=1, width=4).eval()

    model = moekit.insert_routed_adapters(backbone(), BasicBlock, method="smear", num_experts=2, bottleneck=4,
                                          train=["head"], bank_kwargs={"up_init_scale": 1.0})  # fmt: skip
    assert all(p.requires_grad for p in model.head.parameters())
    with torch.no_grad():
        model.head.weight.add_(1.0)  # as if trained
    x = torch.randn(2, 1, 8, 8)
    path = save_checkpoint(model, tmp_path / "adapted")
    assert (path / "adapters" / "adapters.json").is_file()
    loaded = load_checkpoint(path).eval()
    assert set(moekit.adapter_sites(loaded)) == set(moekit.adapter_sites(model))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert all(p.requires_grad for p in loaded.head.parameters()) and not loaded.stem[0].weight.requires_grad
    torch.testing.assert_close(load_checkpoint(path, model=backbone()).eval()(x)[0], model(x)[0])


def _edit(path: Path, change) -> None:
    meta = json.loads((path / ckpt.CONFIG_NAME).read_text())
    change(meta)
    (path / ckpt.CONFIG_NAME).write_text(json.dumps(meta))


def test_configs_and_weights_that_would_be_silently_misread_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(_model(), tmp_path / "c")
    good_config, good_weights = (path / ckpt.CONFIG_NAME).read_text(), (path / ckpt.WEIGHTS_NAME).read_bytes()
    _edit(path, lambda m: m.update(version=ckpt.VERSION + 1))
    with pytest.raises(ValueError, match=f"has format version {ckpt.VERSION + 1}, newer than this moekit reads"):
        load_checkpoint(path)
    # sizes that would allocate ~10^13 parameters are checked against the file's header first
    _edit(path, lambda m: m.update(version=1) or m["config"].update(num_experts=10**6, hidden=10**7))
    with pytest.raises(ValueError, match=r"hidden=10000000 exceeds the largest tensor extent \(256\)"):
        load_checkpoint(path)
    (path / ckpt.CONFIG_NAME).write_text(good_config)

    state = load_file(str(path / ckpt.WEIGHTS_NAME))
    save_file({**state, "head.weight": state["head.weight"].to(torch.int32)}, str(path / ckpt.WEIGHTS_NAME))
    with pytest.raises(TypeError, match=r"wrong dtype: head.weight \(int32, expected float32\)"):
        load_checkpoint(path)
    bad = state["embed.weight"].clone()
    bad[3, 1] = float("inf")
    save_file({**state, "embed.weight": bad}, str(path / ckpt.WEIGHTS_NAME))
    with pytest.raises(ValueError, match="hold NaN/inf values in tensors embed.weight"):
        load_checkpoint(path)
    assert torch.isinf(load_checkpoint(path, check_finite=False).embed.weight).any()  # on request
    (path / ckpt.WEIGHTS_NAME).write_bytes(good_weights)
    load_checkpoint(path)


@pytest.mark.parametrize("change", [
    {"depth": 10**5}, {"dim": 10**9}, {"max_seq_len": 10**12}, {"router_outputs_per_layer": [10**7, 8]},
    {"router": "comet", "experts_per_layer": None, "router_outputs_per_layer": None, "num_experts": 10**5},
    {"router_kwargs": {"num_keys": 10**6}, "router": "hash"},
], ids=["depth", "dim", "max_seq_len", "router_outputs", "comet_experts", "hash_keys"])
def test_absurd_config_sizes_are_refused_before_anything_is_built(tmp_path: Path, change: dict, monkeypatch) -> None:
    """A config whose sizes no tensor of the file could hold is refused from the header alone: before,
    even the meta-device build allocated a router's O(E) tables on the CPU (comet: 0.7 GB per 10^6
    experts), the merged layer's expert map, or overflowed torch's size arithmetic (a raw RuntimeError)."""
    path = save_checkpoint(_model(), tmp_path / "c")
    _edit(path, lambda m: m["config"].update(change))
    monkeypatch.setattr(ckpt.MODELS, "create", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"exceeds the (largest tensor extent \(\d+\)|\d+ tensors) of its weights"):
        load_checkpoint(path)


def test_absurd_expert_parallel_config_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    """load_distributed_model built the model for real from the config before any check."""
    from moekit.distributed import save_distributed_checkpoint
    from moekit.distributed.model import ep_moe_classifier

    config = {"in_dim": 6, "num_classes": 4096, "dim": 8, "num_experts": 4}  # a head [4096, 8]: extent 4096
    save_distributed_checkpoint(ep_moe_classifier(**config), tmp_path / "ep", name="ep_moe_classifier", config=config)
    _edit(tmp_path / "ep", lambda m: m["config"].update(num_experts=10**5))
    with pytest.raises(ValueError, match="num_experts=100000 exceeds the largest tensor extent"):
        load_checkpoint(tmp_path / "ep")
    _edit(tmp_path / "ep", lambda m: m["config"].update(num_experts=4096, dim=4096))  # each fits, together they do not
    with pytest.raises(ValueError, match="describes [0-9,]+ bytes of tensors but its weights files hold"):
        load_checkpoint(tmp_path / "ep")


def test_a_checkpoint_is_never_saved_over_the_directory_it_was_loaded_from(tmp_path: Path) -> None:
    path = save_checkpoint(_model(), tmp_path / "runs" / "c")
    before = (path / ckpt.WEIGHTS_NAME).read_bytes()
    model = load_checkpoint(path)
    for target in (path, path.parent, path / "sub"):
        with pytest.raises(ValueError, match="the input"):
            save_checkpoint(model, target, overwrite=True)
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="lies inside the input"):
        save_checkpoint(_model(), tmp_path / "data" / "ck", inputs=[tmp_path / "data"])
    assert (path / ckpt.WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"] and not any((tmp_path / "data").iterdir())


def test_every_registered_model_builds_on_the_meta_device() -> None:
    """load_checkpoint builds the model on the meta device to check sizes before allocating."""
    import moekit.distributed.model  # noqa: F401  (registers ep_moe_classifier)
    import moekit.models.classifier  # noqa: F401
    import moekit.models.multitask  # noqa: F401
    from moekit.registry import MODELS

    configs = {
        "moe_lm": {"dim": 16, "depth": 1, "heads": 2, "num_experts": 4, "hidden": 8, "experts_per_layer": [2]},
        "resnet_moe": {"width": 8},
        "moe_classifier": {"in_dim": 8, "num_classes": 3, "dim": 8, "num_experts": 4, "router": "hash",
                           "router_kwargs": {"num_keys": 5}},
        "ep_moe_classifier": {"in_dim": 8, "num_classes": 3, "dim": 8, "num_experts": 4},
        "mmoe": {"in_dim": 8, "tasks": [{"name": "a"}, {"name": "b", "kind": "regression", "num_outputs": 1}],
                 "num_experts": 4, "router": "topk", "router_kwargs": {"k": 2}},
    }
    assert set(configs) == set(MODELS.names())
    for name, config in configs.items():
        with torch.device("meta"):
            model = MODELS.create(name, **config)
        assert {t.device.type for t in model.state_dict().values()} == {"meta"}, name
