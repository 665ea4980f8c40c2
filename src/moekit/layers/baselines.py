"""The baselines of the SMEAR comparison, and one factory that builds every method by name on the
same kind of expert bank (https://arxiv.org/abs/2306.03745, Sec. 4 and the official code's
``routing_estimator`` values).

    block = build_routed_block("smear", bank="adapter", dim=64, num_experts=8, width=16)
    out = block(x_BSD, mask=mask_BS, meta={"tag": domain_B, "example_ids": ids_B})   # -> MoEOutput

``ROUTED_METHODS`` maps each name to a one-line description.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..experts.base import ExpertBank
from ..registry import EXPERTS, ROUTERS
from ..routers.base import Router
from ..routers.smear import SMEARRouter
from ..types import MoEOutput, RoutingDecision
from .checks import check_layer_input
from .example_routed import ExampleRoutedMoE
from .pooling import check_mask
from .smear import SMEAR

__all__ = ["ROUTED_METHODS", "SingleExpert", "OutputEnsemble", "build_routed_block"]

ROUTED_METHODS: dict[str, str] = {
    "smear": "SMEAR: one expert merged per example with the router's probabilities",
    "tag": "metadata routing: the example's tag (e.g. its domain) picks its expert",
    "hash": "a fixed random expert per example id (and per site)",
    "top1": "top-1 of the router's softmax, output scaled by its probability",
    "st_gumbel": "top-1 with straight-through Gumbel-softmax, temperature annealed",
    "reinforce": "top-1 sampled, REINFORCE with a learned baseline",
    "dselect": "DSelect-k with k=1 (smooth-step binary selector)",
    "adamix": "AdaMix: a random expert per example in training, the average of all experts at inference",
    "latent_skills": "Latent Skills (Polytropon): learned tag x expert weights, merged as in SMEAR",
    "ensemble": "every expert runs, outputs mixed by SMEAR's router (E x compute)",
    "dense_1x_compute": "one expert of the same size, no routing (SMEAR's compute)",
    "dense_1x_params": "one expert E times wider, no routing (SMEAR's parameter count)",
}

#: sparse methods: the registered router each one needs, and whether it is learned (gets a LayerNorm'd input)
_SPARSE = {
    "tag": ("tag", False),
    "hash": ("hash", False),
    "top1": ("topk", True),
    "st_gumbel": ("st_gumbel", True),
    "reinforce": ("reinforce", True),
    "dselect": ("dselect", True),
}
#: parameter-averaging baselines: the registered dense router each one merges with
_MERGED = {"adamix": "adamix", "latent_skills": "latent_skills"}
_WIDTH_ARG = {"adapter": "bottleneck", "mlp": "hidden", "glu": "hidden"}


class SingleExpert(nn.Module):
    """One expert and no router: the 1x-compute and 1x-parameters baselines.

    ``forward(x, *, mask=None, meta=None) -> MoEOutput`` with the same call as the routed blocks
    (mask and meta are validated, not used); the decision sends every example to expert 0.
    """

    def __init__(self, experts: ExpertBank) -> None:
        super().__init__()
        if not isinstance(experts, ExpertBank) or experts.num_experts != 1:
            raise ValueError(f"experts must be an ExpertBank with num_experts=1, got {experts!r}")
        self.experts = experts

    @property
    def num_experts(self) -> int:
        return 1

    def forward(self, x: Tensor, *, mask: Tensor | None = None, meta: Mapping[str, Any] | None = None) -> MoEOutput:
        check_layer_input(x, self.experts)
        x_T = self.experts.as_tokens(x)
        if x.shape[0] == 0 or (x.dim() == 3 and self.experts.token_input and x.shape[1] == 0):
            raise ValueError(f"cannot run empty input: shape {tuple(x.shape)}")
        B = x.shape[0]
        if mask is not None:
            if x.dim() != 3 or not self.experts.token_input:
                raise ValueError(f"mask is for sequences [B, S, D], got input of shape {tuple(x.shape)}")
            check_mask(mask, x)
        for key, value in (meta or {}).items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] != B:
                raise ValueError(f"meta[{key!r}] has {value.shape[0]} entries but the batch has {B} examples")
        y = self.experts.restore(self.experts.expert_forward(x_T, 0), x)
        ids = torch.zeros(B, 1, dtype=torch.long, device=x.device)
        decision = RoutingDecision(ids_TK=ids, weights_TK=torch.ones(B, 1, device=x.device), num_experts=1)
        return MoEOutput(y=y, aux={}, decision=decision)


class OutputEnsemble(ExampleRoutedMoE):
    """Every expert runs on every position; outputs are mixed with SMEAR's router probabilities
    (the official code's ``soft_routing``). The same router as ``SMEAR``, E times its compute."""

    def __init__(
        self,
        experts: ExpertBank,
        router: Router | None = None,
        *,
        expert_dropout: float = 0.1,
        router_init_std: float = 1e-2,
        segment_len: int | None = None,
        first_segment: str = "self",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if router is None:
            router = SMEARRouter.for_bank(experts, expert_dropout=expert_dropout, init_std=router_init_std,
                                          device=device, dtype=dtype)  # fmt: skip
        super().__init__(router, experts, combine="dense", segment_len=segment_len, first_segment=first_segment,
                         device=device, dtype=dtype)  # fmt: skip


def build_routed_block(
    method: str,
    *,
    dim: int,
    num_experts: int,
    width: int,
    bank: str = "adapter",
    num_keys: int | None = None,
    tag_key: str = "tag",
    hash_key: str = "example_ids",
    segment_len: int | None = None,
    first_segment: str = "self",
    bank_kwargs: Mapping[str, Any] | None = None,
    router_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build one method of the comparison; every block is called as ``block(x, mask=, meta=) -> MoEOutput``.

    Args:
        method: a key of ``ROUTED_METHODS``.
        dim: input (and output) width of the site.
        num_experts: E (the dense baselines have one expert: of ``width`` or of ``E * width``).
        width: the bottleneck (adapter) or hidden size (mlp, glu) of one expert.
        bank: expert bank name, ``"adapter"``, ``"mlp"`` or ``"glu"``.
        num_keys: number of distinct example ids (hash routing).
        tag_key, hash_key: the ``meta`` entries holding the tags and the example ids.
        segment_len, first_segment: route causal segments (Lory) instead of whole examples.
        bank_kwargs, router_kwargs: extra keyword arguments for the bank and the router.
    """
    check_choice("method", method, ROUTED_METHODS)
    check_choice("bank", bank, _WIDTH_ARG)
    E, width = check_int("num_experts", num_experts, low=1), check_int("width", width, low=1)
    kw: dict[str, Any] = {"device": device, "dtype": dtype}

    def make_bank(n: int, w: int) -> ExpertBank:
        return EXPERTS.create(bank, num_experts=n, dim=dim, **{_WIDTH_ARG[bank]: w}, **dict(bank_kwargs or {}), **kw)

    if method == "dense_1x_compute":
        return SingleExpert(make_bank(1, width))
    if method == "dense_1x_params":
        return SingleExpert(make_bank(1, width * E))
    seg = {"segment_len": segment_len, "first_segment": first_segment}
    rkw = dict(router_kwargs or {})
    if method in ("smear", "ensemble"):
        router = SMEARRouter(dim, E, **rkw, **kw)
        cls = SMEAR if method == "smear" else OutputEnsemble
        return cls(make_bank(E, width), router, **seg, **kw)
    if method in _MERGED:
        extra = {"key": tag_key} if method == "latent_skills" else {}
        router = ROUTERS.create(_MERGED[method], dim=dim, num_experts=E, **{**extra, **rkw}, **kw)
        return SMEAR(make_bank(E, width), router, **seg, **kw)
    name, learned = _SPARSE[method]
    if name not in ROUTERS:
        raise ValueError(f"method {method!r} needs the router {name!r}, which is not registered in this install "
                         f"(registered: {', '.join(ROUTERS.names())})")  # fmt: skip
    args: dict[str, Any] = {"dim": dim, "num_experts": E, **kw}
    if method == "hash":
        if num_keys is None:
            raise ValueError("method 'hash' needs num_keys (the number of distinct example ids)")
        args.update(num_keys=num_keys, key=hash_key)
    elif method == "tag":
        args.update(key=tag_key)
    elif method == "top1":
        args.update(k=1, noisy=False, renormalize=False)
    elif method == "dselect":
        args.update(k=1)
    router = ROUTERS.create(name, **{**args, **rkw})
    return ExampleRoutedMoE(router, make_bank(E, width), combine="sparse", router_norm=learned, **seg, **kw)
