"""The model under evaluation: a causal language model with its tokenisation, whatever it came from.

``EvalModel`` wraps either a module with moekit's LM contract (``model(tokens [B, S]) -> (logits
[B, S, V], ...)``, byte level: token = byte) or a Hugging Face causal LM (``model(input_ids,
attention_mask).logits``) with the tokenizer saved beside it, if any. ``load_model`` detects which a
directory holds: a moekit checkpoint (``config.json`` with ``"format": "moekit"``), or a Hugging Face
model directory -- a family moekit knows goes through ``moekit.load_hf_model`` (which also loads the
exact merged form), any other causal LM through ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_int

__all__ = ["EvalModel", "load_model", "wrap_model", "DEFAULT_MAX_CONTEXT"]

#: longest window (tokens) one forward sees unless ``context=`` says otherwise (Hugging Face models
#: often allow far more than a CPU evaluation wants)
DEFAULT_MAX_CONTEXT = 2048


@dataclass
class EvalModel:
    """A causal LM as the evaluation sees it.

    Attributes:
        module: the network (eval mode).
        kind: ``"moekit"`` (byte level, moekit's LM contract) or ``"huggingface"``.
        name: a label (the directory it was loaded from, or the class name).
        vocab_size: size of the output distribution V.
        context: most tokens one forward gets (windows are cut to it).
        tokenizer: a Hugging Face tokenizer, or None (byte level, or token-id data only).
        prefix_token: prepended to each document when scoring perplexity, so that the first token
            is predicted too (the tokenizer's BOS, else its EOS, as lm-eval does); None for byte level.
        info: what the JSON records about the model (path, parameters, config digest).
    """

    module: nn.Module
    kind: str
    name: str
    vocab_size: int
    context: int
    tokenizer: Any = None
    prefix_token: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def byte_level(self) -> bool:
        """Whether tokens are bytes (moekit LMs): then bits per token are bits per byte."""
        return self.kind == "moekit"

    @property
    def device(self) -> torch.device:
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def encode(self, text: bytes) -> list[int]:
        """Token ids of ``text`` (UTF-8 bytes): the bytes themselves at byte level, else the
        tokenizer's ids without special tokens."""
        if self.byte_level:
            ids = list(text)
            if ids and max(ids) >= self.vocab_size:
                raise ValueError(f"text has byte {max(ids)} but {self.name!r} has vocab_size={self.vocab_size}")
            return ids
        if self.tokenizer is None:
            raise ValueError(
                f"{self.name!r} has no tokenizer, so text cannot be scored; save its tokenizer in the model "
                "directory or give token-id files (.safetensors / .jsonl with input_ids)"
            )
        return list(self.tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"])

    def encode_pair(self, context: bytes, continuation: bytes) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)``, split as lm-eval does: the continuation's ids are those of
        ``context + continuation`` after the context's own ids (so tokens merging across the boundary
        are not broken), falling back to encoding the continuation alone when the prefix differs."""
        ctx = self.encode(context)
        if self.byte_level:
            return ctx, self.encode(continuation)
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.encode(continuation)

    def decode(self, ids: Sequence[int]) -> str:
        """Readable text of ``ids`` (for reports)."""
        if self.byte_level:
            return bytes(ids).decode("utf-8", errors="replace")
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids))

    def check_tokens(self, ids: Sequence[int], where: str) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"{where} has token ids outside [0, {self.vocab_size}) of {self.name!r}")

    @torch.no_grad()
    def logits(self, ids_BS: Tensor, mask_BS: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, S, V]`` (float32) of right-padded ``ids_BS`` (``mask_BS`` marks the
        real tokens; padding comes after them, so causal attention never lets it reach a real token)."""
        ids_BS = ids_BS.to(self.device)
        if self.kind == "moekit":
            out = self.module(ids_BS)[0]
        else:
            mask = mask_BS.to(self.device) if mask_BS is not None else None
            out = self.module(input_ids=ids_BS, attention_mask=mask).logits
        return out.float()

    def same_vocabulary(self, other: "EvalModel") -> bool:
        """Whether token ids mean the same to both models (needed to compare their distributions)."""
        if self.byte_level != other.byte_level or self.vocab_size != other.vocab_size:
            return False
        if self.tokenizer is None or other.tokenizer is None:
            return self.tokenizer is None and other.tokenizer is None
        return self.tokenizer.get_vocab() == other.tokenizer.get_vocab()


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def wrap_model(
    module: nn.Module, *, tokenizer: Any = None, name: str | None = None, context: int | None = None
) -> EvalModel:
    """An ``EvalModel`` for a module in memory: a Hugging Face causal LM (it has a ``config`` with a
    ``model_type``), or anything with moekit's LM contract (``max_seq_len`` and ``vocab_size`` are read
    from the module or its ``config()``)."""
    module.eval()
    name = name or type(module).__name__
    config = getattr(module, "config", None)
    if config is not None and not callable(config) and hasattr(config, "model_type"):
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{name!r} is an encoder-decoder model ({config.model_type}); moekit eval scores causal LMs"
            )
        longest = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
        limit = check_int("context", context, low=2) if context is not None else min(longest, DEFAULT_MAX_CONTEXT)
        prefix = None
        for owner in (tokenizer, config):
            for attr in ("bos_token_id", "eos_token_id"):
                value = getattr(owner, attr, None) if owner is not None else None
                if isinstance(value, list):
                    value = value[0] if value else None
                if prefix is None and isinstance(value, int):
                    prefix = value
        info = {"kind": "huggingface", "model_type": config.model_type, "parameters": _parameters(module),
                "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None}  # fmt: skip
        return EvalModel(module, "huggingface", name, int(config.vocab_size), min(limit, longest), tokenizer, prefix, info)
    spec = module.config() if callable(getattr(module, "config", None)) else {}
    vocab = getattr(module, "vocab_size", None) or spec.get("vocab_size")
    longest = getattr(module, "max_seq_len", None) or spec.get("max_seq_len")
    if not isinstance(vocab, int) or not isinstance(longest, int):
        raise ValueError(
            f"{name!r} is neither a Hugging Face causal LM nor a moekit language model "
            "(needs vocab_size and max_seq_len, and model(tokens) -> (logits, ...))"
        )
    limit = min(check_int("context", context, low=2), longest) if context is not None else longest
    info = {"kind": "moekit", "parameters": _parameters(module), "tokenizer": "bytes"}
    return EvalModel(module, "moekit", name, vocab, limit, None, None, info)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def use_cpu_kernels(module: nn.Module, *, progress: bool = False) -> dict[str, Any]:
    """Run ``module`` on moekit's CPU inference kernels, in place: a transformers model's experts on
    ``experts_implementation="moekit"``, its plain ``nn.Linear`` layers through ``linears_for_inference`` and its
    large tensors onto transparent huge pages where the kernel has them (``to_huge_pages``); what was done, for
    the run's record (a step that does not apply says why); ``progress``: a bar while the weights move."""
    from ..experts import linears_for_inference, to_huge_pages
    from ..experts.inference import InferenceLinear

    done: dict[str, Any] = {"experts_implementation": None, "linears": 0, "huge_pages": None}
    if hasattr(module, "set_experts_implementation"):
        import moekit.integrations.hf  # noqa: F401  (registers the "moekit" experts implementation)

        try:
            module.set_experts_implementation("moekit")
            done["experts_implementation"] = "moekit"
        except (ValueError, AttributeError) as err:  # a model without experts, or one transformers cannot switch
            done["experts_implementation"] = f"unchanged: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    try:
        linears_for_inference(module)
    except ValueError:  # no plain nn.Linear: nothing to switch
        pass
    done["linears"] = sum(type(m) is InferenceLinear for m in module.modules())
    try:
        done["huge_pages"] = to_huge_pages(module, progress=progress).summary()
    except (RuntimeError, ValueError) as err:  # no huge pages here, or no tensor large enough
        done["huge_pages"] = f"not moved: {err}"
    return done


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    context: int | None = None,
    progress: bool = False,
    cpu_kernels: bool = False,
) -> EvalModel:
    """Load the model in directory ``path`` (moekit checkpoint or Hugging Face model) for evaluation;
    ``progress`` lets transformers show its loading bars; ``cpu_kernels``: run it on moekit's CPU inference
    kernels (``use_cpu_kernels``; recorded in ``info["cpu_kernels"]``).

    Raises FileNotFoundError for a missing directory or config, ValueError for anything that is not a
    causal language model or cannot be loaded (one line, naming the path).
    """
    from ..checkpoint import read_config_json

    path = Path(path)
    if cpu_kernels and torch.device(device).type != "cpu":
        raise ValueError(f"cpu_kernels runs the model on moekit's CPU kernels; got device {str(device)!r}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"model {str(path)!r} is not a directory (give a moekit checkpoint or Hugging Face model)")
    meta = read_config_json(path, what="model")
    if isinstance(meta, dict) and meta.get("format") == "moekit":
        from ..checkpoint import load_checkpoint

        config = meta.get("config") or {}
        if not isinstance(config, dict) or "vocab_size" not in config or "max_seq_len" not in config:
            raise ValueError(f"{str(path)!r} holds a {meta.get('model')!r} model; moekit eval needs a language model")
        module = load_checkpoint(path, map_location=device)
        model = wrap_model(module, name=str(path), context=context)
        model.info["model"] = meta.get("model")
    elif isinstance(meta, dict) and "model_type" in meta:
        module, tokenizer = _load_hf(path, device, progress)
        model = wrap_model(module, tokenizer=tokenizer, name=str(path), context=context)
    else:
        raise ValueError(f"{str(path / 'config.json')!r} is neither a moekit checkpoint nor a Hugging Face model config")
    model.info.update({"path": str(path), "config_sha256": _file_sha256(path / "config.json")})
    if cpu_kernels:
        model.info["cpu_kernels"] = use_cpu_kernels(model.module, progress=progress)
    return model


def _load_hf(path: Path, device: str | torch.device, progress: bool) -> tuple[nn.Module, Any]:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..data.calibration import find_tokenizer
    from ..integrations.hf import family_for, load_hf_model
    from ..integrations.hf.checks import (
        check_config_fits_weights,
        check_loaded_model,
        quiet_transformers,
        require_safetensors,
    )

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{str(path)!r} is an encoder-decoder model ({config.model_type}); moekit eval scores causal LMs")
        try:
            family_for(config)
        except ValueError:  # not a family moekit merges: any causal LM transformers can load, as strictly
            require_safetensors(path, "AutoModelForCausalLM")
            check_config_fits_weights(path, config)
            with quiet_transformers():
                module, info = AutoModelForCausalLM.from_pretrained(
                    path, output_loading_info=True, ignore_mismatched_sizes=True, use_safetensors=True
                )
            check_loaded_model(module, info, where=str(path))
        else:
            module = load_hf_model(path)
    except (OSError, RuntimeError, SafetensorError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the Hugging Face model in {str(path)!r}: {first}") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return module.to(device).eval(), find_tokenizer(path)
