"""A sweep over every registered router, expert bank and loss -- including the ones other parts of
moekit register later. A router is built from ``(dim, num_experts)`` plus ``k`` when its constructor
takes one; routers that need more get an entry in ``ROUTER_KWARGS`` / ``ROUTER_META``. A router
that cannot be built fails the sweep (it is not skipped), so the table gets updated."""

import inspect

import pytest
import torch

import moekit
from moekit.registry import EXPERTS, LOSSES, ROUTERS

DIM, E, T, K = 16, 6, 20, 2

#: constructor arguments beyond (dim, num_experts[, k]) for routers that need them
ROUTER_KWARGS: dict[str, dict] = {"hash": {"num_keys": 50}}
#: metadata the router reads (hash keys, tags), one value per token
ROUTER_META: dict[str, dict] = {
    "hash": {"token_ids": torch.arange(T) % 50},
    "tag": {"tag": torch.arange(T) % E},
    "latent_skills": {"tag": torch.arange(T) % E},
}


def build_router(name: str) -> moekit.Router:
    factory = ROUTERS.get(name)
    kwargs = {"dim": DIM, "num_experts": E, **ROUTER_KWARGS.get(name, {})}
    if "k" in inspect.signature(factory).parameters:
        kwargs["k"] = K
    try:
        return factory(**kwargs)
    except Exception as err:  # noqa: BLE001 -- turn any failure into an actionable message
        pytest.fail(f"router {name!r} cannot be built from {sorted(kwargs)} ({err!r}); "
                    f"add its constructor arguments to ROUTER_KWARGS in {__file__}")


def task_loss(out: moekit.MoEOutput) -> torch.Tensor:
    """Output loss + every unweighted aux term + REINFORCE terms for score-function routers."""
    loss = out.y.square().mean() + sum(out.aux.values(), torch.zeros(()))
    if "log_prob" in out.decision.extras:
        terms = moekit.reinforce_terms(out.decision, out.y.square().mean(-1))
        loss = loss + terms["policy"] + terms["value"]
    return loss


def test_registry_lists_the_standard_routers() -> None:
    assert {"softmax", "topk", "switch", "expert_choice", "hash", "tag"} <= set(moekit.list_routers())
    for entry in ROUTERS.entries():
        assert entry.paper.startswith("https://"), f"router {entry.name!r} has no paper link"
        assert entry.summary, f"router {entry.name!r} has no summary"


@pytest.mark.parametrize("name", moekit.list_routers())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_router_routes_and_backprops(name: str, training: bool) -> None:
    router = build_router(name).train(training)
    assert isinstance(router, moekit.Router)
    meta = ROUTER_META.get(name)
    x = torch.randn(T, DIM, requires_grad=True)
    d = router(x, meta=meta)
    assert isinstance(d, moekit.RoutingDecision) and d.num_experts == E
    assert d.ids_TK.shape == d.weights_TK.shape and d.ids_TK.shape[0] == T and 1 <= d.k <= E
    assert d.ids_TK.dtype == torch.long and int(d.ids_TK.min()) >= 0 and int(d.ids_TK.max()) < E
    assert d.kept_TK is None or (d.kept_TK.shape == d.ids_TK.shape and d.kept_TK.dtype == torch.bool)
    for field in ("logits_TE", "probs_TE", "load_prob_TE"):
        value = getattr(d, field)
        assert value is None or (value.shape == (T, E) and bool(torch.isfinite(value).all())), field
    assert bool(torch.isfinite(d.weights_TK).all()) and bool((d.weights_TK >= 0).all())
    gates = d.gates_TE()
    assert bool((gates.sum(-1) <= 1 + 1e-5).all()), "combine weights of a token sum to more than 1"
    chosen = torch.zeros(T, E).scatter_add_(1, d.ids_TK, d.kept_mask().float())
    assert bool((chosen <= 1).all()), "an expert is chosen twice for one token"
    if router.is_sparse and d.k > router.k:  # K = E slots (expert choice, tree gates): a mask says which live
        assert d.kept_TK is not None, "sparse router returns more than k slots without a kept mask"
    for term, value in d.aux.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), term

    layer = moekit.MoE(router, moekit.MLPExperts(E, DIM, 8))
    out = layer(x, meta=meta)
    assert out.y.shape == x.shape and bool(torch.isfinite(out.y).all())
    task_loss(out).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    params = list(router.parameters())
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    if params and training:  # a learnable router learns (hard top-1 routers may not in eval)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "router gets no gradient"


@pytest.mark.parametrize("name", moekit.list_routers())
def test_every_router_reloads_from_its_state_dict(name: str) -> None:
    """Tables, biases and permutations live in parameters/buffers, so a state dict round-trips."""
    torch.manual_seed(1)
    source = build_router(name).eval()
    torch.manual_seed(2)
    target = build_router(name).eval()
    target.load_state_dict(source.state_dict())
    x = torch.randn(T, DIM)
    a, b = source(x, meta=ROUTER_META.get(name)), target(x, meta=ROUTER_META.get(name))
    assert torch.equal(a.ids_TK, b.ids_TK)
    torch.testing.assert_close(a.effective_weights(), b.effective_weights())


@pytest.mark.parametrize("name", moekit.list_experts())
def test_every_expert_bank_builds_and_runs(name: str) -> None:
    factory = EXPERTS.get(name)
    params = inspect.signature(factory).parameters
    size = next(p for p in ("hidden", "bottleneck", "out_channels") if p in params)
    first = "in_channels" if "in_channels" in params else "dim"
    bank = factory(num_experts=3, **{first: 4, size: 8})
    x = torch.randn(5, 4, 6, 6) if not bank.token_input else torch.randn(5, 4)
    router = moekit.TopKRouter(4, 3, 2)
    out = moekit.MoE(router, bank)(x)
    assert out.y.shape[0] == 5 and bool(torch.isfinite(out.y).all())
    out.y.sum().backward()
    assert all(p.grad is not None for p in bank.parameters())


@pytest.mark.parametrize("name", moekit.list_losses())
def test_every_loss_is_a_finite_scalar_with_router_gradient(name: str) -> None:
    router = moekit.TopKRouter(DIM, E, K).train()
    with torch.no_grad():
        router.noise.weight.normal_()
    d = router(torch.randn(T, DIM))
    value = LOSSES.get(name)(d)
    assert value.dim() == 0 and value.dtype == torch.float32 and bool(torch.isfinite(value))
    assert value.requires_grad, f"loss {name!r} gives the router no gradient"
    value.backward()
    assert router.gate.weight.grad is not None
