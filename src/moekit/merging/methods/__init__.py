"""Expert-reduction methods of the compression pipeline (``moekit.registry.EXPERT_METHODS``).

A method is one small file: an ``ExpertMethod`` subclass that names the statistics it needs from the
layer-wise observer (``statistics``), scores experts for a global budget (``budget_score``) and turns
one block's weights and statistics into a ``LayerMergeResult`` (``reduce``), registered with
``@EXPERT_METHODS.register(name, paper=...)``.

* ``m-smoe`` (``msmoe.py``): M-SMoE merging (alignment, router-logit grouping, frequency merge).
* ``frequency`` (``frequency.py``): keep the most-routed experts (pruning).
"""

from . import frequency, msmoe  # noqa: F401  (registers the methods)
from .base import ExpertMethod, create_method, list_methods

__all__ = ["ExpertMethod", "create_method", "list_methods"]
