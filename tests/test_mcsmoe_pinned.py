"""M-SMoE results pinned before the pipeline refactor (issue 12): the merged tensors of fixed-seed
moekit and Hugging Face models must stay what the code gave when they were recorded.

``tests/data/mcsmoe_pinned.safetensors`` was written by this module's ``write_fixture`` from the
code of commit f3d09ad (whole-model calibration, then ``merge_layer`` per layer). Group assignments
and expert counts must match exactly; tensors must match bit for bit on the machine that recorded
them and within float rounding elsewhere (BLAS summation order differs between CPUs).

Regenerate only for an intended change of results: ``python tests/test_mcsmoe_pinned.py --write``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

FIXTURE = Path(__file__).parent / "data" / "mcsmoe_pinned.safetensors"


def _moekit_lm(experts: str = "glu") -> torch.nn.Module:
    import moekit

    torch.manual_seed(0)
    model = moekit.MoELM(dim=32, depth=3, heads=2, max_seq_len=32, num_experts=6, k=2, hidden=40, experts=experts)
    with torch.no_grad():  # spread the routers so that frequencies differ between experts
        for block in model.blocks:
            block.moe.router.gate.weight.normal_(0.0, 0.5)
    return model.eval()


def _lm_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (4, 24), generator=g) for _ in range(3)]


def _moekit_case(bank: str, **kwargs: Any) -> Callable[[], dict[str, torch.Tensor]]:
    def run() -> dict[str, torch.Tensor]:
        from moekit.merging import merge_moekit_model

        merged = merge_moekit_model(_moekit_lm(bank), _lm_batches(), quiet=True, **kwargs)
        return {k: v for k, v in merged.state_dict().items() if ".moe." in k}

    return run


def _hf_case(family: str, **kwargs: Any) -> Callable[[], dict[str, torch.Tensor]]:
    def run() -> dict[str, torch.Tensor]:
        from hf_tiny import tiny_model, token_batches

        from moekit.integrations.hf import family_for, merge_hf_model

        model = tiny_model(family)
        merged = merge_hf_model(model, token_batches(), quiet=True, **kwargs)
        blocks = list(family_for(merged).blocks(merged))
        return {k: v for k, v in merged.state_dict().items() if any(k.startswith(b + ".") for b in blocks)}

    return run


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "lm_glu_exact_global": _moekit_case("glu", experts=3, form="exact"),
    "lm_glu_plain_uniform": _moekit_case("glu", experts=2, form="plain", budget="uniform"),
    "lm_mlp_exact_anchor0": _moekit_case("mlp", experts=3, form="exact", anchor=0),
    "lm_glu_exclude_expert_output": _moekit_case(
        "glu", experts=2, form="exact", exclude=["blocks.0.moe"], grouping="expert_output"
    ),
    "lm_glu_prune": _moekit_case("glu", experts=2, form="exact", method="prune"),
    "lm_glu_random_plain": _moekit_case("glu", experts=3, form="plain", method="random", seed=3),
    "lm_mlp_uniform_fold_dominant": _moekit_case("mlp", experts=2, form="plain", method="uniform", fold="dominant"),
    "mixtral_plain": _hf_case("mixtral", experts=2, form="plain"),
    "olmoe_exact_global": _hf_case("olmoe", experts=3, form="exact"),
    "qwen2_moe_exact_exclude": _hf_case("qwen2_moe", experts=2, form="exact", exclude=["model.layers.0.mlp"]),
    "qwen3_moe_expert_output": _hf_case("qwen3_moe", experts=3, form="exact", grouping="expert_output"),
    "switch_exact_global": _hf_case("switch_transformers", experts=3, form="exact"),
    "switch_plain_anchor0": _hf_case("switch_transformers", experts=2, form="plain", anchor=0),
}


def _run(name: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {k: v.detach().clone().contiguous() for k, v in CASES[name]().items()}
    finally:
        torch.set_num_threads(threads)


def write_fixture() -> None:
    tensors = {f"{name}/{k}": v for name in CASES for k, v in _run(name).items()}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(FIXTURE), metadata={"recorded_with": "commit f3d09ad"})
    print(f"wrote {len(tensors)} tensors to {FIXTURE}")


@pytest.fixture(scope="module")
def pinned() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


@pytest.mark.parametrize("name", list(CASES))
def test_mcsmoe_results_are_unchanged(name: str, pinned: dict[str, torch.Tensor]) -> None:
    pytest.importorskip("transformers")
    want = {k.split("/", 1)[1]: v for k, v in pinned.items() if k.split("/", 1)[0] == name}
    got = _run(name)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        if not value.is_floating_point():  # expert maps: the grouping itself
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_fixture()
    else:
        print(__doc__)
