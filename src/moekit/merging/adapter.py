"""The block-adapter protocol: what the compression pipeline needs to know about one family's MoE blocks.

One implementation serves moekit's own layers (``moekit.merging.moekit_blocks.MoekitBlocks``) and one
per Hugging Face family (``moekit.integrations.hf.MoEFamily`` subclasses, one small file each). An
adapter says

* which modules are sparse MoE blocks (``blocks``; dense layers are not), their expert count and how
  they route (``routing``: score function, top-k, routing biases, group-limited routing);
* which of a block's tensors are never touched (``shared_tensors``: shared experts and their gates);
* how to read a block into ``ExpertLayerWeights`` (``read``; its bank alone: ``read_bank``) and write a ``LayerMergeResult`` back
  in the plain or exact form (``write``), or a compressed bank (``write_compressed``);
* how to watch a block run (``observe``): hooks that report each call as a ``BlockCall`` -- the
  block's input tokens and the routing the experts really received (after biases, group limits and
  scaling), with the router's logits.

The pipeline (``moekit.merging.pipeline``) uses nothing else about a family.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

from torch import nn

from .weights import BankWeights, ExpertLayerWeights, LayerMergeResult, RoutingSpec

__all__ = ["BlockAdapter", "FORMS"]

#: output forms of a reduced block: ``plain`` (standard block with G experts and a G-row router) or
#: ``exact`` (router unchanged with E outputs, an index map sends its choices to G experts)
FORMS = ("exact", "plain")


class BlockAdapter(abc.ABC):
    """Reads, writes and observes the MoE blocks of one model family (stateless)."""

    name: ClassVar[str]
    #: whether ``write_compressed`` can put a moekit low-rank + sparse bank into this family's blocks
    compressible: ClassVar[bool] = True
    #: whether the exact form can hold MoNE novices (pruned router outputs answered by a constant vector)
    supports_novices: ClassVar[bool] = False

    # ----- structure
    @abc.abstractmethod
    def blocks(self, module: nn.Module) -> dict[str, nn.Module]:
        """``{name relative to module: sparse MoE block}`` in forward order (dense layers excluded)."""

    @abc.abstractmethod
    def num_experts(self, block: nn.Module) -> int:
        """Experts in the block's bank (G for a reduced block)."""

    @abc.abstractmethod
    def router_outputs(self, block: nn.Module) -> int:
        """Outputs of the block's router (E; more than ``num_experts`` in the exact form)."""

    @abc.abstractmethod
    def routing(self, block: nn.Module, config: Any) -> RoutingSpec:
        """How the block routes: score function, top-k, selection bias, groups."""

    def shared_tensors(self, block: nn.Module) -> tuple[str, ...]:
        """Names (relative to the block) of tensors that compression never changes (shared experts)."""
        return ()

    # ----- tensors
    @abc.abstractmethod
    def read(self, block: nn.Module, config: Any) -> ExpertLayerWeights:
        """The block's routed experts and router (detached; may share storage with the block)."""

    @abc.abstractmethod
    def read_bank(self, block: nn.Module, config: Any) -> BankWeights:
        """The block's expert bank alone (also of a reduced block in the exact form, whose router
        keeps E outputs): what the low-rank step compresses."""

    @abc.abstractmethod
    def write(self, block: nn.Module, result: LayerMergeResult, form: str, config: Any) -> nn.Module:
        """The block with G experts: ``form="plain"`` a G-row router from ``result.weights``;
        ``"exact"`` the router unchanged and ``result.expert_map`` applied to its choices. Returns the
        block (changed in place) or a replacement module for the same place."""

    def write_compressed(self, block: nn.Module, bank: nn.Module, config: Any) -> nn.Module:
        """The block with its experts replaced by the compressed bank ``bank`` (a moekit low-rank +
        sparse bank with the same experts). Families that cannot run a moekit bank refuse."""
        raise ValueError(f"{self.name}: compressed experts (--rank) are not supported for this family")

    def block_output(self, output: Any) -> Any:
        """The output tensor of a block's forward (``[..., D]``; default: the first of a tuple)."""
        return output[0] if isinstance(output, tuple) else output

    # ----- observation
    @abc.abstractmethod
    def observe(self, block: nn.Module, config: Any, sink: Callable[..., None]) -> list[Any]:
        """Install hooks that call ``sink(call: BlockCall)`` for every forward of the block; returns
        the hook handles (``handle.remove()``)."""
