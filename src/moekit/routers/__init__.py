"""Routers, registered by name (``moekit.list_routers()``)."""

from .base import LinearScorer, Router
from .capacity import apply_capacity, expert_capacity
from .expert_choice import ExpertChoiceRouter
from .hash import HashRouter, balanced_assignment
from .softmax import SoftmaxRouter
from .tag import TagRouter
from .topk import SwitchRouter, TopKRouter

__all__ = [
    "Router",
    "LinearScorer",
    "apply_capacity",
    "expert_capacity",
    "SoftmaxRouter",
    "TopKRouter",
    "SwitchRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "balanced_assignment",
    "TagRouter",
]
