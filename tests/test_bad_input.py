"""Bad input gives errors that name the argument, its value and what is allowed; the CLI prints
them in one line without a traceback and exits non-zero."""

import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.models.classifier import MoEClassifier


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: moekit.TopKRouter(8, 4, 5), ValueError, r"k must be <= num_experts \(4\), got k=5"),
        (lambda: moekit.TopKRouter(8, 4, 0), ValueError, "k must be >= 1, got 0"),
        (lambda: moekit.TopKRouter(8, 4, 1.5), TypeError, "k must be an int, got 1.5"),
        (lambda: moekit.TopKRouter(8, 0, 1), ValueError, "num_experts must be >= 1, got 0"),
        (lambda: moekit.SoftmaxRouter(8, -2), ValueError, "num_experts must be >= 1, got -2"),
        (lambda: moekit.MLPExperts(0, 8, 16), ValueError, "num_experts must be >= 1, got 0"),
        (lambda: moekit.TopKRouter(0, 4, 1), ValueError, "dim must be >= 1, got 0"),
        (lambda: moekit.TopKRouter(8, 4, 2, capacity_factor=0.0), ValueError, "capacity_factor must be a finite number > 0, got 0"),
        (lambda: moekit.SwitchRouter(8, 4, capacity_factor=-1.0), ValueError, "capacity_factor must be a finite number > 0, got -1"),
        (lambda: moekit.SwitchRouter(8, 4, capacity_factor=float("nan")), ValueError, "capacity_factor must be a finite number > 0"),
        (lambda: moekit.ExpertChoiceRouter(8, 4, capacity_factor=0), ValueError, "capacity_factor must be a finite number > 0, got 0"),
        (lambda: moekit.TopKRouter(8, 4, 2, capacity_factor="1"), TypeError, "capacity_factor must be a number"),
        (lambda: moekit.MLPExperts(4, 8, 16, activation="swish2"), ValueError, "activation must be one of"),
        (lambda: moekit.TopKRouter(8, 4, balancer=moekit.AuxFreeBias(3)), ValueError, "balancer has num_experts=3"),
        (lambda: moekit.HashRouter(8, 4, num_keys=5, mode="balanced"), ValueError, "needs key_counts of length"),
        (lambda: moekit.HashRouter(8, 4, num_keys=5, mode="modulo"), ValueError, "mode must be one of"),
        (lambda: moekit.TagRouter(8, 4, mapping={0: 9}), ValueError, r"mapping sends tags to experts outside \[0, 4\)"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(3, 8, 16)), ValueError,
         "router has num_experts=4 but experts has num_experts=3"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 6, 16)), ValueError,
         "router has dim=8 but experts has dim=6"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16), combine="soft"), ValueError,
         "combine must be one of"),
        (lambda: moekit.MoE(torch.nn.Linear(8, 4), moekit.MLPExperts(4, 8, 16)), TypeError,
         "router must be a moekit Router, got Linear"),
        (lambda: moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16, device="meta")), ValueError,
         "router is on cpu but experts are on meta"),
        (lambda: moekit.create_router("nope", dim=8, num_experts=4), ValueError, "unknown router 'nope'; registered:"),
        (lambda: moekit.get_loss("nope"), ValueError, "unknown loss 'nope'"),
    ],
)
def test_config_errors(make, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_wrong_input_shapes() -> None:
    layer = moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16))
    with pytest.raises(ValueError, match=r"input must have last dimension dim=8, got shape \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"router input must be \[T, dim=8\]"):
        layer.router(torch.randn(2, 3, 8))
    conv = moekit.MoE(moekit.TopKRouter(3, 2, 1), moekit.ConvExperts(2, 3, 4))
    with pytest.raises(ValueError, match=r"input must be \[N, C=3, H, W\]"):
        conv(torch.randn(2, 5, 4, 4))


def test_input_dtype_and_device_must_match_the_experts() -> None:
    layer = moekit.MoE(moekit.TopKRouter(8, 4), moekit.MLPExperts(4, 8, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="input has dtype torch.float32 but experts have dtype torch.float64"):
        layer(torch.randn(3, 8))
    assert layer(torch.randn(3, 8, dtype=torch.float64)).y.dtype == torch.float64  # fp32 router maths is fine
    with pytest.raises(ValueError, match="input is on meta but experts are on cpu"):
        layer(torch.randn(3, 8, device="meta", dtype=torch.float64))


def test_non_finite_logits_name_the_layer_and_can_be_switched_off() -> None:
    model = MoEClassifier(8, 3, dim=8, num_experts=4, router="topk", router_kwargs={"noisy": False})
    x = torch.randn(3, 8)
    x[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite router logits in blocks\.0\.router \(TopKRouter\)"):
        model(x)
    standalone = moekit.TopKRouter(8, 4, noisy=False)
    with pytest.raises(FloatingPointError, match="in TopKRouter: 4 of 12 values"):
        standalone(x)
    standalone.check_finite = False
    assert standalone(x).ids_TK.shape == (3, 2)
    moekit.TopKRouter(8, 4, noisy=False, check_finite=False)(x)


def test_routing_metadata_errors() -> None:
    hashed = moekit.HashRouter(8, 4, num_keys=10)
    with pytest.raises(ValueError, match=r"HashRouter needs meta\['token_ids'\] \(one integer per token\)"):
        hashed(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"must lie in \[0, num_keys=10\), got range \[1, 11\]"):
        hashed(torch.randn(2, 8), meta={"token_ids": torch.tensor([1, 11])})
    with pytest.raises(ValueError, match=r"must be an integer tensor of shape \[2\]"):
        hashed(torch.randn(2, 8), meta={"token_ids": torch.tensor([0.5, 1.0])})
    with pytest.raises(ValueError, match=r"has tags \[7\] with no expert"):
        moekit.TagRouter(4, 3)(torch.randn(2, 4), meta={"tag": torch.tensor([0, 7])})
    layer = moekit.MoE(moekit.TagRouter(4, 3), moekit.MLPExperts(3, 4, 8))
    with pytest.raises(ValueError, match=r"meta\['tag'\] has shape \(3,\); expected the input's leading shape"):
        layer(torch.randn(2, 5, 4), meta={"tag": torch.tensor([0, 1, 2])})


def test_losses_and_training_errors() -> None:
    from moekit.training import train_classifier

    model = MoEClassifier(4, 2, dim=8, num_experts=2, router="topk", router_kwargs={"k": 1})
    data = (torch.randn(6, 4), torch.tensor([0, 1] * 3))
    with pytest.raises(ValueError, match="aux_weights names 'imprtance', which is neither a registered loss"):
        train_classifier(model, data, epochs=1, aux_weights={"imprtance": 0.1}, progress=False)
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        train_classifier(model, data, epochs=0, progress=False)
    with pytest.raises(ValueError, match="as many labels as inputs"):
        train_classifier(model, (torch.randn(6, 4), torch.zeros(5, dtype=torch.long)), progress=False)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--routers", "no_such_router", "--quick"], "no_such_router"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["demo", "--experts", "1", "--quick"], "--experts must be >= 2, got 1"),
    ],
)
def test_cli_prints_one_line_error_and_exits_non_zero(argv: list[str], match: str, capsys, tmp_path) -> None:
    out = tmp_path / "never-written"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and match in err and "Traceback" not in err and err.startswith("moekit demo: error:")
    assert not out.exists()  # bad input leaves nothing behind


def test_cli_refuses_an_output_path_that_is_a_file(tmp_path, capsys) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"
