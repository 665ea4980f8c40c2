"""``torch.compile`` of moekit layers: every registered router and bank compiles and matches eager on
CPU, in one graph (``fullgraph=True``) where the router allows it; the routers and banks that break the
graph are listed here with the reason (README, "Speed": the same list) and the test fails when that list
goes stale. Dynamo-only sweeps (``backend="eager"``) keep it fast; two Inductor runs check the compiled
kernels themselves (fp32 through ``moekit::grouped_mm``, bf16 through ``F.grouped_mm``)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

import moekit
from moekit.experts import dispatch_reference
from moekit.merging import LowRankSparseExperts, PackedLowRankSparseExperts

sys.path.insert(0, str(Path(__file__).parent))
from test_registry_sweep import DIM, ROUTER_META, E, T, build_router  # noqa: E402

#: routers whose forward reads tensor values on the host (one graph break each, and why)
GRAPH_BREAKING_ROUTERS = {
    "comet": "the number of live experts per token is read (smooth-step gates: K is data-dependent)",
    "dselect": "the number of live experts per token is read (smooth-step gates: K is data-dependent)",
    "hash": "token ids are range-checked on the host before the table lookup",
    "latent_skills": "tags are range-checked on the host",
    "local_search": "the learning step counter and the finite check are read on the host",
    "switch": "capacity: slots per expert (bincount) have a data-dependent size",
    "tag": "unmapped tags are checked on the host",
}
#: routers that break the graph in training only
TRAINING_GRAPH_BREAKING_ROUTERS = {"st_gumbel": "the temperature schedule reads the step counter on the host"}
#: banks that break the graph (with a top-k router)
GRAPH_BREAKING_BANKS = {
    "conv": "images are split per expert by their counts (torch.split of host sizes)",
    "packed_lowrank_sparse": "each expert's kept residual rows are added per expert (host sizes)",
}


def _layer(name: str, training: bool, bank: moekit.ExpertBank | None = None) -> moekit.MoE:
    torch.manual_seed(0)
    router = build_router(name)
    router.check_finite = False  # the finite check reads a value on the host (see test below)
    return moekit.MoE(router, bank or moekit.GLUExperts(E, DIM, 16)).train(training)


def _compare(layer, x, meta, *, fullgraph: bool, backend="eager", tol=None) -> int:
    """Compiled and eager outputs (and, in training, input and parameter gradients) agree, each run on a
    fresh copy of the layer (routers update state); returns the number of graphs compiled."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(layer)
        fn = torch.compile(model, backend=counter, fullgraph=fullgraph) if compiled else model
        xi = x.detach().clone().requires_grad_(layer.training)
        torch.manual_seed(1)  # stochastic routers draw the same numbers
        out = fn(xi, meta=meta)
        grads = []
        if layer.training:
            (out.y.float().square().sum() + sum(out.aux.values(), torch.zeros(()))).backward()
            grads = [xi.grad] + [p.grad for p in model.parameters() if p.grad is not None]
        results.append((out.y.detach(), grads))
    (y_eager, g_eager), (y_comp, g_comp) = results
    kw = tol or {}
    torch.testing.assert_close(y_comp, y_eager, **kw)
    assert len(g_comp) == len(g_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, **kw)
    return counter.frame_count


@pytest.mark.parametrize("name", moekit.list_routers())
def test_every_router_compiles_and_matches_eager(name: str) -> None:
    """Training mode (forward and backward; the superset of what eval traces)."""
    layer = _layer(name, training=True)
    breaks = name in GRAPH_BREAKING_ROUTERS or name in TRAINING_GRAPH_BREAKING_ROUTERS
    graphs = _compare(layer, torch.randn(T, DIM), ROUTER_META.get(name), fullgraph=not breaks)
    assert (graphs > 1) == breaks, "update GRAPH_BREAKING_ROUTERS and the README"


COMPRESSED = {
    "lowrank_sparse": lambda: LowRankSparseExperts(moekit.GLUExperts(E, DIM, 16), 3),
    "packed_lowrank_sparse": lambda: PackedLowRankSparseExperts.from_masked(
        LowRankSparseExperts(moekit.MLPExperts(E, DIM, 16), 3)
    ),
}


@pytest.mark.parametrize("bank", [*moekit.list_experts(), *COMPRESSED])
def test_every_bank_compiles_and_matches_eager(bank: str) -> None:
    torch.manual_seed(0)
    if bank in COMPRESSED:
        experts = COMPRESSED[bank]()
    else:
        factory = moekit.registry.EXPERTS.get(bank)
        experts = factory(E, 3, 8) if bank == "conv" else factory(E, DIM, 12)
    dim = experts.router_features(torch.randn(2, 3, 6, 6)).shape[-1] if not experts.token_input else DIM
    layer = moekit.MoE(moekit.TopKRouter(dim, E, 2, check_finite=False), experts).train()
    x = torch.randn(5, 3, 6, 6) if not experts.token_input else torch.randn(T, DIM)
    breaks = bank in GRAPH_BREAKING_BANKS
    assert (_compare(layer, x, None, fullgraph=not breaks) > 1) == breaks, "update GRAPH_BREAKING_BANKS and the README"


def test_finite_check_costs_one_break_and_still_matches() -> None:
    layer = moekit.MoE(moekit.TopKRouter(DIM, E, 2), moekit.GLUExperts(E, DIM, 16)).eval()
    assert _compare(layer, torch.randn(T, DIM), None, fullgraph=False) > 1
    with pytest.raises(FloatingPointError, match="non-finite router logits"):
        torch.compile(layer, backend="eager")(torch.full((T, DIM), float("nan")))


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,bank", [(torch.float32, "mlp"), (torch.bfloat16, "glu")], ids=["fp32-mlp", "bf16-glu"]
)
def test_inductor_fullgraph_matches_eager(dtype, bank) -> None:
    """The compiled kernels: fp32 runs ``moekit::grouped_mm`` (the CPU ``F.grouped_mm`` compiles for bf16
    only), bf16 ``F.grouped_mm``; forward and backward against eager, forward against the per-expert
    reference."""
    torch.manual_seed(0)
    experts = (moekit.MLPExperts if bank == "mlp" else moekit.GLUExperts)(E, DIM, 16, dtype=dtype)
    router = moekit.TopKRouter(DIM, E, 2, noisy=False, check_finite=False)  # Inductor draws its own noise
    layer = moekit.MoE(router, experts).train()
    x = torch.randn(T, DIM, dtype=dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else None
    assert _compare(layer, x, None, fullgraph=True, backend="inductor", tol=tol) == 1
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out.y, dispatch_reference(experts, x, out.decision), **(tol or {}))
