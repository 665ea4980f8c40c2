"""Bad input gives errors that name the argument, its value and what is allowed."""

import pytest
import torch

import moekit
from moekit.cli.main import main


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: moekit.TopKRouter(8, 4, 5), "k must be <= num_experts"),
        (lambda: moekit.TopKRouter(8, 4, 0), "k must be >= 1"),
        (lambda: moekit.TopKRouter(8, 0, 1), "num_experts must be >= 1"),
        (lambda: moekit.TopKRouter(8, 4, 2, capacity_factor=0.0), "capacity_factor must be > 0"),
        (lambda: moekit.ExpertChoiceRouter(8, 4, capacity_factor=-1.0), "capacity_factor must be > 0"),
        (lambda: moekit.MLPExperts(4, 8, 16, activation="swish2"), "activation must be one of"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(3, 8, 16)), "num_experts=4"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 6, 16)), "dim=8"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16), combine="soft"), "combine"),
        (lambda: moekit.create_router("nope", dim=8, num_experts=4), "unknown router 'nope'"),
    ],
)
def test_config_errors(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_k_type_error() -> None:
    with pytest.raises(TypeError, match="k must be an int"):
        moekit.TopKRouter(8, 4, 1.5)


def test_wrong_input_dim() -> None:
    layer = moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16))
    with pytest.raises(ValueError, match="last dimension dim=8"):
        layer(torch.randn(3, 7))


def test_dtype_mismatch_between_router_and_experts() -> None:
    layer = moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16, dtype=torch.float64))
    with pytest.raises((TypeError, RuntimeError)):
        layer(torch.randn(3, 8))


def test_non_finite_logits_name_the_layer_and_can_be_switched_off() -> None:
    router = moekit.TopKRouter(8, 4, noisy=False)
    x = torch.randn(3, 8)
    x[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="TopKRouter"):
        router(x)
    router.check_finite = False
    router(x)


def test_missing_meta_for_hash_router() -> None:
    with pytest.raises(ValueError, match="meta\\['token_ids'\\]"):
        moekit.HashRouter(8, 4, num_keys=10)(torch.randn(3, 8))
    with pytest.raises(ValueError, match="num_keys=10"):
        moekit.HashRouter(8, 4, num_keys=10)(torch.randn(2, 8), meta={"token_ids": torch.tensor([1, 11])})


def test_meta_shape_mismatch() -> None:
    layer = moekit.MoE(moekit.TagRouter(4, 3), moekit.MLPExperts(3, 4, 8))
    with pytest.raises(ValueError, match="meta\\['tag'\\] has shape"):
        layer(torch.randn(2, 5, 4), meta={"tag": torch.tensor([0, 1, 2])})


def test_cli_prints_one_line_error(capsys) -> None:
    code = main(["demo", "--routers", "no_such_router", "--quick", "--out", "/tmp/moekit-never-written"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no_such_router" in err and "Traceback" not in err
