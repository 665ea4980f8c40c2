"""A model as a stack of units for layer-wise calibration and compression.

The pipeline runs a model unit by unit (decoder layers, in order) on cached hidden states: ``prepare``
turns a calibration batch into the first unit's input and a per-batch context (attention masks,
position embeddings, ...), ``run`` applies one unit, ``logits`` finishes the model. Only the unit
being processed needs its weights in memory. Implementations: ``MoELMStack`` (moekit's ``MoELM``),
``WholeModelStack`` (any model as one unit, e.g. an encoder-decoder or a bare ``MoE``), and
``moekit.integrations.hf.stack.DecoderStack`` (Hugging Face decoder-only families).
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from torch import Tensor, nn

from ..stats import default_forward
from .adapter import BlockAdapter

__all__ = ["LayerStack", "WholeModelStack", "MoELMStack", "set_module"]


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` inside ``root`` (``name`` non-empty)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class LayerStack(abc.ABC):
    """Units of a model in forward order, and how hidden states flow between them.

    Attributes:
        model: the model (possibly a skeleton on the meta device while streaming).
        adapter: the block adapter of its MoE blocks.
        config: what the adapter needs (the Hugging Face config; None for moekit models).
    """

    #: the plain form needs one expert count in every block (stock configs hold one number)
    uniform_plain: bool = False

    def __init__(self, model: nn.Module, adapter: BlockAdapter, config: Any = None) -> None:
        self.model, self.adapter, self.config = model, adapter, config

    @abc.abstractmethod
    def units(self) -> list[str]:
        """Module names of the units in order (``""`` = the whole model)."""

    def unit(self, name: str) -> nn.Module:
        return self.model.get_submodule(name) if name else self.model

    def replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` in place of the module called ``name`` (``""`` replaces the model)."""
        if name:
            set_module(self.model, name, module)
        else:
            self.model = module

    def context_modules(self) -> list[str]:
        """Modules outside the units that ``prepare`` runs (they need their weights then)."""
        return []

    def head_modules(self) -> list[str]:
        """Modules outside the units that ``logits`` runs."""
        return []

    @abc.abstractmethod
    def prepare(self, batch: Any) -> tuple[Any, Any]:
        """``(input of the first unit, per-batch context)`` for one calibration batch."""

    @abc.abstractmethod
    def run(self, index: int, hidden: Any, context: Any) -> Any:
        """Output of unit ``index`` on ``hidden`` (its weights are loaded)."""

    def logits(self, hidden: Any, context: Any) -> Tensor:
        """The model's output from the last unit's output."""
        return hidden

    def valid_tokens(self, batch: Any) -> Tensor | None:
        """Mask of real (non-padding) tokens of ``batch`` in the order blocks see them, or None."""
        return None

    def finish(self, form: str, record: dict[str, Any]) -> None:
        """Record the compression in the model's own config (when it has one)."""


class WholeModelStack(LayerStack):
    """The whole model as one unit: ``forward(model, batch)`` (default ``model(batch)``, or
    ``model(batch[0])`` for tuples). Works for any model; hidden states never leave the model, so
    statistics are those of the model as given (``propagate="original"``)."""

    def __init__(
        self, model: nn.Module, adapter: BlockAdapter, config: Any = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(model, adapter, config)
        self.forward = forward or default_forward

    def units(self) -> list[str]:
        return [""]

    def prepare(self, batch: Any) -> tuple[Any, Any]:
        return batch, None

    def run(self, index: int, hidden: Any, context: Any) -> Any:
        return self.forward(self.model, hidden)


class MoELMStack(LayerStack):
    """moekit's ``MoELM``: units ``blocks.{i}``; tokens ``[B, S]`` -> ``embed_tokens`` -> blocks ->
    ``output_logits``."""

    def units(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.model.blocks))]

    def context_modules(self) -> list[str]:
        return ["embed", "pos"]

    def head_modules(self) -> list[str]:
        return ["norm", "head"]

    def prepare(self, batch: Any) -> tuple[Tensor, Any]:
        tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model.embed_tokens(tokens), None

    def run(self, index: int, hidden: Tensor, context: Any) -> Tensor:
        return self.model.blocks[index](hidden)[0]

    def logits(self, hidden: Tensor, context: Any) -> Tensor:
        return self.model.output_logits(hidden)
