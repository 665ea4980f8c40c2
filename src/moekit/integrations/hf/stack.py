"""Hugging Face models as layer stacks for the compression pipeline (``moekit.merging.stack``).

``DecoderStack`` runs a decoder-only model one decoder layer at a time without re-implementing any
model's forward: to prepare a batch, every decoder layer is swapped for a recorder that notes the
arguments the model's own forward passes it (attention masks per layer type, rotary position
embeddings, position ids, ...) and returns its input, the last one stopping the forward; the
recorded arguments are the batch's context and the first recorder's input is the first layer's
input. ``logits`` replays the model's forward with the layers swapped for a module that returns the
last layer's output, so the model's own final norm and head (and any scaling) make the logits.
Encoder-decoder families (SwitchTransformers) run as one unit (``WholeModelStack``).

Both record the compression in ``config.moekit_merge`` and, for the plain form, set the config's
expert count (``finish``).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ...merging.stack import LayerStack, WholeModelStack
from .base import MoEFamily, family_for

__all__ = ["DecoderStack", "HFWholeModelStack", "hf_stack", "decoder_layers_name", "MERGE_CONFIG_KEY"]

#: config attribute (and config.json key) describing a moekit-compressed model
MERGE_CONFIG_KEY = "moekit_merge"


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward is not needed."""


class _Recorder(nn.Module):
    def __init__(self, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], first: list[Tensor], stop: bool) -> None:
        super().__init__()
        self.calls, self.first, self.stop = calls, first, stop

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.first:
            self.first.append(hidden_states)
        self.calls.append((args, kwargs))
        if self.stop:
            raise _Stop
        return hidden_states


class _Replay(nn.Module):
    def __init__(self, output: Tensor | None) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states if self.output is None else self.output


def decoder_layers_name(model: nn.Module) -> str:
    """Name of the ``nn.ModuleList`` holding the decoder layers (the one with ``num_hidden_layers``
    entries that contains the MoE blocks)."""
    config = model.config.get_text_config()
    count = int(getattr(config, "num_hidden_layers"))
    family = family_for(model)
    blocks = list(family.blocks(model))
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and all(b.startswith(f"{name}.") for b in blocks):
            return name
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} decoder layers contains its MoE blocks")


class _HFRecord:
    """``finish``: the config records the compression; the plain form sets the expert count."""

    model: nn.Module
    adapter: MoEFamily

    def finish(self, form: str, record: dict[str, Any]) -> None:
        counts = {layer["experts"] for layer in record["layers"].values()}
        if form == "plain" and counts:
            self.adapter.set_num_experts(self.model, max(counts))
        setattr(self.model.config, MERGE_CONFIG_KEY, record)


class DecoderStack(_HFRecord, LayerStack):
    """A decoder-only Hugging Face model: units = its decoder layers. Batches are token ids ``[B, S]``
    or ``{"input_ids": ..., "attention_mask": ...}``."""

    uniform_plain = True

    def __init__(self, model: nn.Module, family: MoEFamily) -> None:
        super().__init__(model, family, model.config)
        self.layers_name = decoder_layers_name(model)
        self.layers: nn.ModuleList = model.get_submodule(self.layers_name)

    def units(self) -> list[str]:
        return [f"{self.layers_name}.{i}" for i in range(len(self.layers))]

    def context_modules(self) -> list[str]:
        head = self.model.get_output_embeddings()
        return [n for n in self.head_modules() if self.model.get_submodule(n) is not head]

    def head_modules(self) -> list[str]:
        """Everything outside the decoder layers (embeddings, rotary embedding, final norm, head)."""
        out: list[str] = []

        def walk(module: nn.Module, prefix: str) -> None:
            for child_name, child in module.named_children():
                name = f"{prefix}{child_name}"
                if name == self.layers_name:
                    continue
                if self.layers_name.startswith(f"{name}."):
                    walk(child, f"{name}.")
                else:
                    out.append(name)

        walk(self.model, "")
        return out

    def _forward(self, batch: Any, layers: list[nn.Module]) -> Any:
        saved = list(self.layers)
        for i, layer in enumerate(layers):
            self.layers[i] = layer
        try:
            return self.model(**_inputs(batch), use_cache=False)
        finally:
            for i, layer in enumerate(saved):
                self.layers[i] = layer

    def prepare(self, batch: Any) -> tuple[Tensor, Any]:
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        first: list[Tensor] = []
        n = len(self.layers)
        try:
            self._forward(batch, [_Recorder(calls, first, stop=i == n - 1) for i in range(n)])
        except _Stop:
            pass
        return first[0], {"batch": batch, "calls": calls}

    def run(self, index: int, hidden: Tensor, context: Any) -> Tensor:
        args, kwargs = context["calls"][index]
        out = self.layers[index](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: Tensor, context: Any) -> Tensor:
        n = len(self.layers)
        return self._forward(context["batch"], [_Replay(hidden if i == n - 1 else None) for i in range(n)]).logits

    def valid_tokens(self, batch: Any) -> Tensor | None:
        mask = _inputs(batch).get("attention_mask")
        return None if mask is None else mask.reshape(-1).bool()


class HFWholeModelStack(_HFRecord, WholeModelStack):
    """A Hugging Face model as one unit (encoder-decoder families, or a custom ``forward``); the
    unit's output is the model's logits."""

    uniform_plain = True

    def run(self, index: int, hidden: Any, context: Any) -> Any:
        out = super().run(index, hidden, context)
        return getattr(out, "logits", out)


def _inputs(batch: Any) -> dict[str, Tensor]:
    if isinstance(batch, Tensor):
        return {"input_ids": batch}
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    raise TypeError(f"a calibration batch must be token ids [B, S] or a dict with input_ids, got {type(batch).__name__}")


def hf_stack(model: nn.Module, forward: Callable[[nn.Module, Any], Any] | None = None) -> LayerStack:
    """The stack of a Hugging Face MoE model: decoder layers for decoder-only families, else (or with
    a custom ``forward(model, batch)``) the whole model as one unit."""
    family = family_for(model)
    if forward is None and family.decoder_only:
        return DecoderStack(model, family)
    return HFWholeModelStack(model, family, model.config, forward=forward or family.forward_tokens)
