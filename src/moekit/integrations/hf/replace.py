"""Fine-tune a Hugging Face MoE with moekit's routers and balancers, in a normal transformers loop.

    from moekit.integrations.hf import replace_routers, save_hf_model, load_hf_model

    model = AutoModelForCausalLM.from_config(config)           # Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
    replace_routers(model, "comet", aux_weights={"entropy_reg": 1e-4}, router_kwargs={"gamma": 1.0})
    Trainer(model=model, args=args, train_dataset=data).train()  # outputs.loss includes the balancing terms
    save_hf_model(model, "out")                                  # records the routers in config.json
    load_hf_model("out")                                         # same logits

Each MoE block's ``gate`` becomes a ``MoekitGate`` around a moekit router (``"topk"``: noisy top-k,
Shazeer et al. 2017, https://arxiv.org/abs/1701.06538; ``"comet"``: Ibrahim et al. 2023,
https://arxiv.org/abs/2306.02824; ``"dselect"``: Hazimeh et al. 2021, https://arxiv.org/abs/2106.03760).
The gate returns what the block's experts take, ``(logits [T, E], weights [T, K], ids [T, K])``, so
the experts, attention and everything else stay the family's own (any ``experts_implementation``).

* ``"topk"`` starts from the Hugging Face router's weights, with the family's softmax / top-k /
  renormalisation and no noise unless ``router_kwargs={"noisy": True}``: before training the model
  computes exactly what it did. COMET and DSelect-k have other parameters and start fresh.
* Balancing: ``balancer`` names a selection-only balancer (``moekit.balancing.BALANCERS``:
  ``aux_free`` = Wang et al. 2024's bias, ``relative`` / ``mean`` = Pavlitska et al.'s hard importance
  constraints; routers that pick by logits only, i.e. ``"topk"``), and ``aux_weights`` weights
  balancing losses (``moekit.list_losses()``: ``switch``, ``importance``, ``load``, ``z``, ...) or the
  router's own terms (COMET / DSelect-k ``entropy_reg``). In training mode the weighted sum over the
  blocks is added to ``outputs.loss`` (a forward hook on the model), which is what ``Trainer`` and a
  hand-written loop minimise; transformers' own router aux loss is switched off
  (``config.output_router_logits=False``): it reads the stock router class.
* The replacement is recorded in ``config.moekit_routers``. ``save_hf_model`` marks the directory
  moekit-only (stock ``from_pretrained`` would initialise the missing stock routers at random; it
  raises instead, naming ``moekit.load_hf_model``), and ``load_hf_model`` rebuilds the routers before
  loading every tensor strictly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ...balancing import BALANCERS, create_balancer
from ...routers.base import Router, name_routers
from ...types import RoutingDecision
from .base import RemappedRouter, family_for
from .fused import FusedTopKFamily

__all__ = ["REPLACEABLE", "ROUTERS_CONFIG_KEY", "MoekitGate", "apply_router_record", "gates", "replace_routers"]

#: the ``config`` field recording a replacement (read by ``load_hf_model``)
ROUTERS_CONFIG_KEY = "moekit_routers"
#: moekit routers that can take a Hugging Face MoE block's router slot
REPLACEABLE = ("topk", "comet", "dselect")
#: routers that pick experts by (balancer-adjusted) logits and so take a selection-only balancer
_TAKES_BALANCER = ("topk",)


class RouterStep(NamedTuple):
    """What ``moekit.training.aux_terms`` reads of one block's forward: its aux terms and decision."""

    aux: Mapping[str, Tensor]
    decision: RoutingDecision


class MoekitGate(nn.Module):
    """A moekit ``router`` in a Hugging Face MoE block's router slot.

    ``forward(hidden [T, D]) -> (logits [T, E], weights [T, K], ids [T, K])`` as the family's top-k
    router returns (``logits`` are the router's logits, or log-probabilities for routers without
    logits; dropped slots have weight 0). In training mode with gradients on, each call's decision
    is kept in ``steps`` for the balancing loss (cleared at the start of every model forward);
    ``last_decision`` is the latest one.
    """

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router
        self.num_experts = router.num_experts
        self.top_k = router.k
        self.steps: list[RouterStep] = []
        self.last_decision: RoutingDecision | None = None
        # the router's constant (non-persistent) buffers, which transformers' loader leaves uninitialised
        self._constants = {n: b.detach().clone() for n, b in self.named_buffers() if _non_persistent(self, n)}

    def restore_constants(self) -> None:
        """Write back the constant buffers (``load_hf_model`` calls it after ``from_pretrained``)."""
        with torch.no_grad():
            for name, value in self._constants.items():
                buffer = self.get_buffer(name)
                buffer.copy_(value.to(buffer.device, buffer.dtype))

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden.reshape(-1, self.router.dim)
        decision = self.router(x_TD)
        self.last_decision = decision
        if self.training and torch.is_grad_enabled():
            self.steps.append(RouterStep(decision.aux, decision))
        logits = decision.logits_TE
        if logits is None:
            logits = decision.probs_TE.clamp_min(torch.finfo(decision.probs_TE.dtype).tiny).log()
        return logits, decision.effective_weights().to(hidden.dtype), decision.ids_TK


def _non_persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(owner)._non_persistent_buffers_set


def gates(model: nn.Module) -> dict[str, MoekitGate]:
    """``{module path: MoekitGate}`` of a model whose routers were replaced (empty otherwise)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoekitGate)}


def _plain_json(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold JSON values (it is saved in config.json), got {value!r}") from None


def _build_router(record: Mapping[str, Any], stock: nn.Module) -> Router:
    """The moekit router of ``record`` for a block whose stock router is ``stock``."""
    from ...registry import create_router

    weight = stock.weight
    E, D = int(weight.shape[0]), int(weight.shape[1])
    kwargs = dict(record["router_kwargs"])
    if record["router"] == "topk":  # the family's routing: softmax over E, top-k, renormalised or not
        kwargs.setdefault("noisy", False)
        kwargs.setdefault("renormalize", bool(getattr(stock, "norm_topk_prob", True)))
    if record["balancer"] is not None:
        kwargs["balancer"] = create_balancer(record["balancer"], E, k=record["k"], **record["balancer_kwargs"])
    # on the meta device (transformers' loader builds the model there first) routers are built on the
    # CPU instead: their constant buffers (COMET's leaf paths, DSelect-k's codes) are not in the file
    device = torch.device("cpu") if weight.device.type == "meta" else weight.device
    with device:
        router = create_router(record["router"], dim=D, num_experts=E, k=record["k"], device=device, **kwargs)
    if record["router"] == "topk" and weight.device.type != "meta":
        with torch.no_grad():
            router.gate.weight.copy_(weight.detach().float())
    return router


def _blocks(model: nn.Module) -> tuple[FusedTopKFamily, dict[str, nn.Module]]:
    family = family_for(model)
    if not isinstance(family, FusedTopKFamily):
        supported = "mixtral, qwen2_moe, qwen3_moe, olmoe"
        raise ValueError(f"replace_routers supports the top-k router families ({supported}), not {family.name}")
    blocks = family.blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} ({family.name}) has no sparse MoE block")
    return family, blocks


def _stock_router(name: str, block: nn.Module, family: FusedTopKFamily) -> nn.Module:
    """The block's own Hugging Face router (refused: an exact-form or an already replaced one)."""
    stock = getattr(block, family.router_attr)
    if isinstance(stock, RemappedRouter):
        raise ValueError(f"block {name!r} is in the exact merged form; replace the routers of the original model")
    if isinstance(stock, MoekitGate):
        raise ValueError(f"block {name!r} already has a moekit router ({type(stock.router).__name__})")
    return stock


def apply_router_record(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Put the routers described by ``record`` (a ``config.moekit_routers`` value) into ``model``'s
    blocks and install the balancing loss; used by ``replace_routers`` and ``load_hf_model``."""
    family, blocks = _blocks(model)
    for name in record["blocks"]:
        if name not in blocks:
            raise ValueError(f"config.{ROUTERS_CONFIG_KEY} names block {name!r}, which this model does not have")
        block = blocks[name]
        stock = _stock_router(name, block, family)
        gate = MoekitGate(_build_router(record, stock))
        gate._is_hf_initialized = True  # transformers' weight init must not redraw it (weights come from here or the file)
        setattr(block, family.router_attr, gate)
        if hasattr(block, "top_k"):
            block.top_k = gate.top_k
    name_routers(model)
    _install_loss(model, dict(record["aux_weights"]))
    return model


def _install_loss(model: nn.Module, weights: dict[str, float]) -> None:
    """Forward hooks: clear the gates' steps before each forward; in training, add the weighted
    balancing terms to ``outputs.loss`` after it."""
    from ...training import aux_terms

    for handle in getattr(model, "_moekit_router_hooks", ()):
        handle.remove()
    own = list(gates(model).values())

    def clear(module: nn.Module, args: Any) -> None:
        for gate in own:
            gate.steps.clear()

    def add_loss(module: nn.Module, args: Any, output: Any) -> Any:
        steps = [s for gate in own for s in gate.steps]
        loss = getattr(output, "loss", None)
        if weights and steps and loss is not None:
            terms = aux_terms(steps, weights)  # type: ignore[arg-type]  (reads .aux and .decision only)
            output.loss = loss + sum(weights[n] * v.to(loss.dtype) for n, v in terms.items())
        for gate in own:
            gate.steps.clear()
        return output

    model._moekit_router_hooks = (model.register_forward_pre_hook(clear), model.register_forward_hook(add_loss))


def replace_routers(
    model: nn.Module,
    router: str,
    *,
    k: int | None = None,
    balancer: str | None = None,
    balancer_kwargs: Mapping[str, float] | None = None,
    aux_weights: Mapping[str, float] | None = None,
    router_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace the router of every MoE block of a Hugging Face ``model`` by a moekit ``router``
    (one of ``REPLACEABLE``) in place; returns ``model``.

    Args:
        k: experts per token (default: the config's ``num_experts_per_tok``).
        balancer: a selection-only balancer name (``BALANCERS``; ``"topk"`` only) with ``balancer_kwargs``
            (e.g. ``{"rate": 1e-3}``).
        aux_weights: balancing-loss or router aux-term name -> coefficient, added to ``outputs.loss``
            in training (see the module docstring).
        router_kwargs: more arguments of the router (``gamma`` for COMET / DSelect-k, ``noisy``,
            ``capacity_factor`` for top-k); JSON values, since they are saved in ``config.json``.
    """
    from ...registry import LOSSES

    if router not in REPLACEABLE:
        raise ValueError(f"router must be one of {list(REPLACEABLE)}, got {router!r}")
    family, blocks = _blocks(model)
    top_k = family.top_k(model.config)
    k = top_k if k is None else k
    if balancer is not None:
        if balancer not in BALANCERS:
            raise ValueError(f"balancer must be one of {sorted(BALANCERS)} or None, got {balancer!r}")
        if router not in _TAKES_BALANCER:
            raise ValueError(f"balancer={balancer!r} adjusts logits before a top-k pick, which {router!r} does not "
                             "make; balance it with aux_weights (e.g. {'switch': 0.01})")  # fmt: skip
    elif balancer_kwargs:
        raise ValueError("balancer_kwargs given without a balancer")
    weights = {str(n): float(v) for n, v in (aux_weights or {}).items()}
    record = {
        "router": router, "k": int(k), "blocks": list(blocks),
        "router_kwargs": _plain_json("router_kwargs", dict(router_kwargs or {})),
        "balancer": balancer, "balancer_kwargs": _plain_json("balancer_kwargs", dict(balancer_kwargs or {})),
        "aux_weights": weights,
    }  # fmt: skip
    stock = [_stock_router(name, block, family) for name, block in blocks.items()]
    probe = _build_router(record, stock[0])
    known = set(LOSSES.names()) | set(probe.eval()(torch.zeros(2, probe.dim, device=_device(probe))).aux)
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"aux_weights names {unknown}: neither balancing losses ({', '.join(LOSSES.names())}) "
                         f"nor terms of the {router!r} router ({', '.join(sorted(known - set(LOSSES.names()))) or 'none'})")  # fmt: skip
    apply_router_record(model, record)
    setattr(model.config, ROUTERS_CONFIG_KEY, record)
    model.config.output_router_logits = False
    return model


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
