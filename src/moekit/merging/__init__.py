"""Expert merging and compression (MC-SMoE, Li et al., ICLR 2024, https://arxiv.org/abs/2310.01334).

One pipeline for every MoE (``moekit.merging.pipeline``): a block adapter per family
(``moekit.merging.adapter.BlockAdapter``; ``MoekitBlocks`` here, one per Hugging Face family in
``moekit.integrations.hf``), a layer stack per model format (``moekit.merging.stack``), the
layer-wise observer (``moekit.merging.observer``, statistics in ``moekit.merging.statistics``) and
the expert-reduction methods (``moekit.merging.methods``: ``m-smoe``, ``frequency``).

Building blocks (pure functions on ``ExpertLayerWeights``, family-agnostic):

* ``allocate_experts(frequencies, total=... | per_layer=..., exclude=...)`` -- experts kept per layer
  (global budget with each layer's most-used expert surviving, or uniform).
* ``merge_layer(weights, frequency_E, router_logits_TE, num_groups, method=...)`` -- one layer E -> G,
  recipes in ``moekit.registry.MERGE_METHODS``: ``"mcsmoe"``, ``"prune"``, ``"uniform"``, ``"random"``.
  The result serves both output forms:

  - exact form: the router is unchanged (E outputs); its choice e runs merged expert
    ``result.expert_map[e]`` with the original gate value, so two chosen experts of one group add
    their gates on the same merged expert ("redirect", paper App. A3);
  - plain form: ``result.weights.router_weight [G, D]`` is the router folded to one row per group
    (least-squares fit of the group's log-sum-exp logit, see ``moekit.merging.merge``), giving a
    standard MoE with G experts that needs no index map.

* ``calibrate(model, batches, statistics=...)`` -- observer statistics of every MoE block.
* ``merge_moekit_model(model, calib_batches, experts=..., method=..., form=...)`` -- M-SMoE on a
  moekit model through the pipeline; the input is never modified.
* ``recover`` (KD fine-tune, routers frozen), ``compress_experts`` + ``StructuredPruner`` (low rank +
  structured sparse residual), ``pack_compressed`` (keep only the kept residual rows, so checkpoints
  shrink), ``count_parameters`` / ``lm_flops_per_token`` (cost).
* ``CompressionSpec(..., lowrank=LowRankOptions(rank=...))`` -- the same low-rank + sparse step inside
  the pipeline, block by block, with optional layer-wise recovery (``moekit.merging.lowrank``);
  ``moekit.merging.streaming.compress_checkpoint`` runs it streamed from disk (``moekit compress``).
"""

from .align import align_experts, weight_matching_permutation
from .dominant import allocate_experts, dominant_experts
from .grouping import GROUPINGS, group_by_expert_output, group_by_router_logits, group_randomly
from .compress import LowRankSparseExperts, StructuredPruner, compress_experts, cubic_ratio
from .packed import PackedLowRankSparseExperts, pack_compressed
from .cost import count_parameters, expert_flops_per_token, lm_flops_per_token
from .adapter import FORMS, BlockAdapter
from .layer import MERGES, MergeRecipe, list_merge_methods, merge_layer
from .merge import FOLDS, fold_router, merge_groups
from .methods import ExpertMethod, create_method, list_methods
from .moekit_blocks import MOEKIT_BLOCKS, MoekitBlocks, build_merged_layer, moe_layers, read_moe_layer
from .observer import BlockCall, BlockObserver, Statistic
from .pipeline import BUDGETS, PROPAGATIONS, CompressionSpec, calibrate, merge_moekit_model, run_pipeline
from .lowrank import LowRankOptions, compress_block
from .recovery import recover
from .weights import EXPERT_KINDS, ExpertLayerWeights, LayerMergeResult, RoutingSpec

__all__ = [
    "ExpertLayerWeights",
    "LayerMergeResult",
    "EXPERT_KINDS",
    "allocate_experts",
    "dominant_experts",
    "merge_layer",
    "list_merge_methods",
    "MergeRecipe",
    "MERGES",
    "GROUPINGS",
    "FOLDS",
    "align_experts",
    "weight_matching_permutation",
    "group_by_router_logits",
    "group_by_expert_output",
    "group_randomly",
    "merge_groups",
    "fold_router",
    "calibrate",
    "moe_layers",
    "BlockAdapter",
    "MoekitBlocks",
    "MOEKIT_BLOCKS",
    "BlockCall",
    "BlockObserver",
    "Statistic",
    "ExpertMethod",
    "create_method",
    "list_methods",
    "CompressionSpec",
    "run_pipeline",
    "BUDGETS",
    "PROPAGATIONS",
    "RoutingSpec",
    "merge_moekit_model",
    "read_moe_layer",
    "build_merged_layer",
    "FORMS",
    "recover",
    "LowRankOptions",
    "compress_block",
    "compress_experts",
    "LowRankSparseExperts",
    "StructuredPruner",
    "cubic_ratio",
    "PackedLowRankSparseExperts",
    "pack_compressed",
    "count_parameters",
    "expert_flops_per_token",
    "lm_flops_per_token",
]
