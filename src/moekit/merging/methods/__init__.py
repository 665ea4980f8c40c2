"""Expert-reduction methods of the compression pipeline (``moekit.registry.EXPERT_METHODS``).

A method is one small file: an ``ExpertMethod`` subclass that names the statistics it needs from the
layer-wise observer (``statistics``), scores experts for a global budget (``budget_score``) and turns
one block's weights and statistics into a ``LayerMergeResult`` (``reduce``), registered with
``@EXPERT_METHODS.register(name, paper=...)``. Its options are its constructor's typed keyword-only
arguments, with their help in ``option_help`` (``moekit compress`` builds flags from them,
``moekit.cli._methods``).

* ``m-smoe`` (``msmoe.py``): M-SMoE merging (alignment, router-logit grouping, frequency merge).
* ``frequency`` (``frequency.py``): keep the most-routed experts.
* ``ean`` (``ean.py``): keep the largest summed output norms.
* ``reap`` (``reap.py``): keep the largest mean gate x output norm (REAP).
* ``mone`` (``mone.py``): prune, pruned experts become their mean output (MoNE novices).
* ``hc-smoe`` (``hc_smoe.py``): cluster by mean output (average linkage), frequency-weighted merge.
* ``nae`` (``nae.py``): NAEE subset search on the block's reconstruction error.
* ``random`` (``random_prune.py``), ``uniform`` (``uniform_merge.py``): data-free controls.

Shared pieces: ``_prune.py`` (keep the best-scored experts), ``_groups.py`` (merge a partition),
``protection.py`` (super experts), ``spec.py`` (the merge fronts' method names).
"""

from . import ean, frequency, hc_smoe, mone, msmoe, nae, random_prune, reap, uniform_merge  # noqa: F401  (registers)
from .base import ExpertMethod, create_method, list_methods

__all__ = ["ExpertMethod", "create_method", "list_methods"]
