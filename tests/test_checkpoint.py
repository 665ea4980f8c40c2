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
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
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
    with pytest.raises(ValueError, match="do not match its config"):
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
