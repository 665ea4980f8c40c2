"""The layers whose outputs and gradients ``test_pinned_layers.py`` pins (not collected by pytest).

Each case builds one layer on a fixed seed, runs it on a fixed input in training mode, backpropagates
``sum(y * g) + sum(aux)`` (``g`` a fixed random tensor; REINFORCE terms where the router has them) and
then runs it once more in eval mode under ``no_grad`` (the inference path). ``fingerprint`` reduces
that to a few numbers per tensor (sum, norm, first elements), so a refactor of the forward is checked
against the values of the code before it (``tests/data/pinned_layers.json``, written once by
``tests/data/make_pinned_layers.py``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
from torch import Tensor, nn

import moekit
from moekit.layers import OutputEnsemble, build_routed_block
from moekit.layers.example_routed import ExampleRoutedMoE
from moekit.models.multitask import MultiGateMoE, TaskSpec
from moekit.registry import ROUTERS

D, E, T, K = 8, 4, 10, 2
B, S = 3, 5

#: extra constructor arguments and metadata for routers that need them (as in test_registry_sweep.py)
ROUTER_KWARGS: dict[str, dict[str, Any]] = {"hash": {"num_keys": 50}, "local_search": {"k": 2}}
ROUTER_META: dict[str, Callable[[int], dict[str, Tensor]]] = {
    "hash": lambda n: {"token_ids": torch.arange(n) % 50},
    "tag": lambda n: {"tag": torch.arange(n) % E},
    "latent_skills": lambda n: {"tag": torch.arange(n) % E},
}
_TAKES_K = {"topk", "expert_choice", "hash", "dselect", "comet", "local_search", "st_gumbel", "reinforce", "tag"}


def _router(name: str, dim: int = D, num_experts: int = E) -> moekit.Router:
    import inspect

    factory = ROUTERS.get(name)
    kwargs: dict[str, Any] = {"dim": dim, "num_experts": num_experts, **ROUTER_KWARGS.get(name, {})}
    if "k" in inspect.signature(factory).parameters and "k" not in kwargs:
        kwargs["k"] = K
    return factory(**kwargs)


class Case:
    """A layer factory, its input and how it is called."""

    def __init__(self, build: Callable[[], nn.Module], x_shape: tuple[int, ...], *,
                 call: Callable[[nn.Module, Tensor], Any] | None = None,
                 outputs: Callable[[Any], list[tuple[Tensor, Any]]] | None = None) -> None:
        self.build, self.x_shape = build, x_shape
        self.call = call or (lambda layer, x: layer(x))
        self.outputs = outputs or (lambda out: [(out.y, out)])


def _moe_router_case(name: str) -> Case:
    meta = ROUTER_META.get(name)
    return Case(lambda: moekit.MoE(_router(name), moekit.MLPExperts(E, D, 12)), (T, D),
                call=lambda layer, x: layer(x, meta=None if meta is None else meta(T)))


def _moe_bank_case(bank: str, combine: str = "sparse") -> Case:
    if bank == "conv":
        return Case(lambda: moekit.MoE(moekit.TopKRouter(3, E, K), moekit.ConvExperts(E, 3, 5, 3), combine=combine),
                    (6, 3, 4, 4))
    banks = {"mlp": lambda: moekit.MLPExperts(E, D, 12), "glu": lambda: moekit.GLUExperts(E, D, 12),
             "adapter": lambda: moekit.AdapterExperts(E, D, 4)}
    return Case(lambda: moekit.MoE(moekit.TopKRouter(D, E, K), banks[bank](), combine=combine), (2, T, D))


def _example_case(build: Callable[[], nn.Module], *, masked: bool = True, meta: dict | None = None,
                  shape: tuple[int, ...] = (B, S, D)) -> Case:
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]) if masked else None

    def call(layer: nn.Module, x: Tensor) -> Any:
        return layer(x, mask=mask, meta=meta)

    return Case(build, shape, call=call)


def _multitask_outputs(out: Any) -> list[tuple[Tensor, Any]]:
    return [(o, m) for o, m in zip(out.outputs, out.moe)]


def _remapped() -> nn.Module:
    router = moekit.TopKRouter(D, E, K)
    return moekit.RemappedMoE(router, moekit.MLPExperts(2, D, 12), torch.tensor([0, 1, 1, 0]))


def _local_search() -> nn.Module:
    return moekit.MoE(_router("local_search"), moekit.MLPExperts(E, D, 12))


CASES: dict[str, Case] = {
    **{f"moe_router_{name}": _moe_router_case(name) for name in ROUTERS.names()},
    **{f"moe_bank_{bank}": _moe_bank_case(bank) for bank in ("mlp", "glu", "adapter", "conv")},
    **{f"moe_dense_{bank}": _moe_bank_case(bank, "dense") for bank in ("mlp", "conv")},
    "moe_capacity": Case(lambda: moekit.MoE(moekit.TopKRouter(D, E, K, capacity_factor=0.5),
                                            moekit.MLPExperts(E, D, 12)), (T, D)),
    "resblock_residual_gap": Case(lambda: moekit.ResBlockMoE(3, 6, num_experts=E, k=2, stride=2), (5, 3, 6, 6)),
    "resblock_plain_conv_gate": Case(lambda: moekit.ResBlockMoE(4, 4, num_experts=E, k=1, residual=False, gate="conv",
                                                                gate_channels=6), (5, 4, 4, 4)),
    "resblock_dense": Case(lambda: moekit.ResBlockMoE(4, 4, num_experts=3, k=2, combine="dense"), (4, 4, 4, 4)),
    "convmoe": Case(lambda: moekit.ConvMoE(3, 5, num_experts=E, k=2), (6, 3, 5, 5)),
    "smear_adapter_masked": _example_case(lambda: moekit.SMEAR(moekit.AdapterExperts(E, D, 4))),
    "smear_mlp_vectors": _example_case(lambda: moekit.SMEAR(moekit.MLPExperts(E, D, 6)), masked=False, shape=(B, D)),
    "smear_glu_segments": _example_case(lambda: moekit.SMEAR(moekit.GLUExperts(E, D, 6), segment_len=2)),
    "smear_segments_default": _example_case(
        lambda: moekit.SMEAR(moekit.AdapterExperts(E, D, 4), segment_len=2, first_segment="default")),
    "smear_conv": _example_case(lambda: moekit.SMEAR(moekit.ConvExperts(E, 3, 3, 3)), masked=False,
                                shape=(B, 3, 4, 4)),
    "smear_chunked": _example_case(lambda: moekit.SMEAR(moekit.MLPExperts(E, D, 6), merge_chunk_bytes=1)),
    "example_sparse_topk_norm": _example_case(
        lambda: ExampleRoutedMoE(moekit.TopKRouter(D, E, 1), moekit.AdapterExperts(E, D, 4), router_norm=True)),
    "example_dense_segments": _example_case(
        lambda: ExampleRoutedMoE(moekit.SoftmaxRouter(D, E), moekit.MLPExperts(E, D, 6), combine="dense",
                                 segment_len=2)),
    "example_conv_sparse": _example_case(
        lambda: ExampleRoutedMoE(moekit.TopKRouter(3, E, 2), moekit.ConvExperts(E, 3, 3, 3)), masked=False,
        shape=(B, 3, 4, 4)),
    "example_ensemble": _example_case(lambda: OutputEnsemble(moekit.AdapterExperts(E, D, 4))),
    **{f"routed_{m}": _example_case(
        (lambda m=m: build_routed_block(m, dim=D, num_experts=E, width=4, num_keys=20)),
        meta={"tag": torch.tensor([0, 2, 1]), "example_ids": torch.tensor([3, 7, 11])})
       for m in ("tag", "hash", "top1", "st_gumbel", "reinforce", "dselect", "adamix", "latent_skills",
                 "dense_1x_compute", "dense_1x_params")},
    "remapped": Case(_remapped, (T, D)),
    "remapped_dense": Case(lambda: moekit.RemappedMoE(moekit.SoftmaxRouter(D, E), moekit.MLPExperts(3, D, 12),
                                                      torch.tensor([0, 1, 2, 0]), combine="dense"), (T, D)),
    "multitask_sparse": Case(lambda: MultiGateMoE(D, [TaskSpec("a", "classification", 3), TaskSpec("b", "regression")],
                                                  num_experts=E, expert_dim=6, expert_hidden=8, router="topk",
                                                  router_kwargs={"k": 2}), (T, D), outputs=_multitask_outputs),
    "multitask_dense": Case(lambda: MultiGateMoE(D, [TaskSpec("a", "classification", 3), TaskSpec("b", "regression")],
                                                 num_experts=E, expert_dim=6, expert_hidden=8, combine="dense"),
                            (T, D), outputs=_multitask_outputs),
    "expert_parallel_ws1": Case(lambda: _expert_parallel(), (T, D)),
}


def _expert_parallel() -> nn.Module:
    from moekit.distributed import ExpertParallelMoE, make_groups

    moe = moekit.MoE(moekit.TopKRouter(D, E, K, noisy=False), moekit.MLPExperts(E, D, 12))
    return ExpertParallelMoE.from_moe(moe, make_groups(1))


class single_process_group:
    """A gloo process group of world size 1 (for ``ExpertParallelMoE``), torn down on exit."""

    def __enter__(self) -> None:
        import torch.distributed as dist

        self.owned = not dist.is_initialized()
        if self.owned:
            self.dir = tempfile.TemporaryDirectory()
            dist.init_process_group("gloo", init_method=f"file://{os.path.join(self.dir.name, 'store')}",
                                    rank=0, world_size=1)

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if self.owned:
            dist.destroy_process_group()
            self.dir.cleanup()


def _stats(t: Tensor) -> list[float]:
    t = t.detach().double()
    flat = t.reshape(-1)
    return [float(flat.sum()), float(flat.norm()), *[float(v) for v in flat[:3]]]


def _loss_terms(y: Tensor, out: Any, g: Tensor) -> Tensor:
    loss = (y * g).sum() + sum(out.aux.values(), torch.zeros(()))
    if "log_prob" in out.decision.extras:
        terms = moekit.reinforce_terms(out.decision, y.detach().reshape(y.shape[0], -1).square().mean(-1)
                                       if y.shape[0] == out.decision.num_tokens
                                       else torch.ones(out.decision.num_tokens))
        loss = loss + terms["policy"] + terms["value"]
    return loss


def fingerprint(name: str) -> dict[str, list[float]]:
    """Outputs, decisions, aux terms and gradients of case ``name``, reduced to a few numbers each."""
    case = CASES[name]
    with single_process_group() if name.startswith("expert_parallel") else _nothing():
        torch.manual_seed(0)
        layer = case.build().train()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(*case.x_shape, generator=gen).requires_grad_(True)
        torch.manual_seed(2)
        out = case.call(layer, x)
        result: dict[str, list[float]] = {}
        loss = torch.zeros(())
        for i, (y, moe) in enumerate(case.outputs(out)):
            g = torch.randn(*y.shape, generator=gen)
            result[f"y{i}"] = _stats(y)
            result[f"ids{i}"] = [float(moe.decision.ids_TK.sum()), *moe.decision.ids_TK.reshape(-1)[:4].tolist()]
            result[f"weights{i}"] = _stats(moe.decision.effective_weights())
            for key, value in sorted(moe.aux.items()):
                result[f"aux{i}.{key}"] = _stats(value)
            loss = loss + _loss_terms(y, moe, g)
        loss.backward()
        result["grad.input"] = _stats(x.grad)
        for pname, p in sorted(layer.named_parameters()):
            if p.grad is not None:
                result[f"grad.{pname}"] = _stats(p.grad)
        for bname, buf in sorted(layer.named_buffers()):
            if buf.is_floating_point():
                result[f"buffer.{bname}"] = _stats(buf)
        layer.eval()
        with torch.no_grad():
            torch.manual_seed(3)
            out = case.call(layer, x.detach())
            for i, (y, _) in enumerate(case.outputs(out)):
                result[f"eval.y{i}"] = _stats(y)
    return result


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
