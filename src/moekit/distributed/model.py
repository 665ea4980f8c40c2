"""The model the expert-parallel trainer builds: ``MoEClassifier`` with an optional aux-free balancer
per block, registered in ``MODELS`` so that expert-parallel checkpoints can rebuild it."""

from __future__ import annotations

from typing import Any, Mapping

from ..balancing import AuxFreeBias
from ..models.classifier import MoEClassifier
from ..registry import MODELS

__all__ = ["ep_moe_classifier"]


@MODELS.register("ep_moe_classifier", paper="https://arxiv.org/abs/2408.15664",
                 summary="MoEClassifier with an optional aux-loss-free bias balancer per block")
def ep_moe_classifier(
    in_dim: int,
    num_classes: int,
    *,
    aux_free_rate: float | None = None,
    router_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> MoEClassifier:
    """``MoEClassifier(in_dim, num_classes, **kwargs)``; with ``aux_free_rate`` every block's router
    gets its own ``AuxFreeBias(rate=aux_free_rate)`` (its bias is a buffer saved with the model)."""
    model = MoEClassifier(in_dim, num_classes, router_kwargs=router_kwargs, **kwargs)
    if aux_free_rate is not None:
        for block in model.blocks:
            device = next(block.parameters()).device
            block.router.balancer = AuxFreeBias(block.num_experts, rate=aux_free_rate).to(device)
    return model
