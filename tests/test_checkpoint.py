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
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        load_checkpoint(path)
    meta = json.loads(good_config)
    meta["config"]["hidden"] = 64
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match its config"):
        load_checkpoint(path)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_checkpoint(path)
