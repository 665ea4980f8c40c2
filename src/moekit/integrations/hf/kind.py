"""The Hugging Face model kind of the compression pipeline (``moekit.registry.MODEL_KINDS["huggingface"]``):
an in-memory model's layer stack, a model directory opened for streaming, and its output shard writer.
Registered here so that ``moekit.merging`` reaches Hugging Face models without importing this package."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ...merging.stack import LayerStack
from ...merging.streaming import Opened, opened
from ...registry import MODEL_KINDS


@MODEL_KINDS.register("huggingface", summary="transformers MoE models of a registered family")
class HuggingFaceKind:
    """``ModelKind`` of transformers models (``integrations/hf/stack.py``, ``checkpoint.py``)."""

    @staticmethod
    def stack(model: nn.Module, forward: Any = None) -> LayerStack:
        from .stack import hf_stack

        return hf_stack(model, forward)

    @staticmethod
    def open(directory: Path, meta: dict[str, Any]) -> Opened:
        from .checkpoint import HFCheckpoint, HFCheckpointSource
        from .stack import hf_stack

        checkpoint = HFCheckpoint(directory)
        model = checkpoint.skeleton()
        source = HFCheckpointSource(checkpoint, model)
        return opened("huggingface", directory, hf_stack(model), source, checkpoint.tensor_bytes(), meta)

    @staticmethod
    def writer(directory: Path, source: Any, units: Sequence[str]) -> Any:
        from .checkpoint import HFShardWriter

        return HFShardWriter(directory, source, units)
