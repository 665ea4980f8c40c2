"""Routers, registered by name (``moekit.list_routers()``)."""

from .base import LinearScorer, Router, name_routers
from .capacity import apply_capacity, expert_capacity
from .comet import COMETRouter
from .dselect import DSelectKRouter
from .estimators import ReinforceRouter, STGumbelRouter, reinforce_terms
from .expert_choice import ExpertChoiceRouter
from .hash import HashRouter, balanced_assignment
from .merge_baselines import AdamixRouter, LatentSkillsRouter
from .local_search import PermutationLocalSearch, hungarian, sinkhorn
from .smear import SMEARRouter
from .smooth_step import smooth_step, sparse_decision
from .softmax import SoftmaxRouter
from .tag import TagRouter
from .topk import SwitchRouter, TopKRouter

__all__ = [
    "Router",
    "LinearScorer",
    "name_routers",
    "apply_capacity",
    "expert_capacity",
    "SoftmaxRouter",
    "TopKRouter",
    "SwitchRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "balanced_assignment",
    "TagRouter",
    "DSelectKRouter",
    "COMETRouter",
    "PermutationLocalSearch",
    "smooth_step",
    "sparse_decision",
    "sinkhorn",
    "hungarian",
    "SMEARRouter",
    "AdamixRouter",
    "LatentSkillsRouter",
    "STGumbelRouter",
    "ReinforceRouter",
    "reinforce_terms",
]
