"""Evaluation sets: the data a routing analysis runs a model on, in one safetensors file.

An ``EvalSet`` holds the model inputs with everything an analysis conditions on: labels (per example,
or per token for language models), targets per task (multi-task models), routing metadata that the
forward needs (``meta=``: tags, example ids, hash keys) and extra categorical groups (domain,
superclass, token id). Experiments save theirs next to their checkpoints so that ``moekit analyze``
runs each model on exactly the data it was evaluated on::

    EvalSet(x_test, labels=y_test, groups={"domain": d_test}, class_names=names).save(out / "eval_set.safetensors")
    data = EvalSet.load(path)

Language-model sets come from token ids (``EvalSet.from_tokens``): the label of a token is its
character class (``CHAR_CLASSES``) and the group ``"token"`` is its id, so the analysis can say which
kinds of tokens, and which tokens, each expert takes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..reporting import atomic_write_bytes

__all__ = ["EvalSet", "CHAR_CLASSES", "char_class", "EVAL_SET_KEY"]

EVAL_SET_KEY = "moekit_eval_set"
VERSION = 1
CHAR_CLASSES = ("space", "newline", "lowercase", "uppercase", "digit", "punctuation", "other")


def char_class(text: str) -> int:
    """Index into ``CHAR_CLASSES`` of a token's text: whitespace-only tokens are ``space`` / ``newline``,
    others take the class of their first non-space character (``" the"`` is lowercase)."""
    stripped = text.strip()
    if not stripped:
        return CHAR_CLASSES.index("newline" if ("\n" in text or "\r" in text) else "space")
    c = stripped[0]
    if c.isascii() and c.islower():
        return CHAR_CLASSES.index("lowercase")
    if c.isascii() and c.isupper():
        return CHAR_CLASSES.index("uppercase")
    if c.isascii() and c.isdigit():
        return CHAR_CLASSES.index("digit")
    if c.isascii() and c.isprintable():
        return CHAR_CLASSES.index("punctuation")
    return CHAR_CLASSES.index("other")


@dataclass(frozen=True)
class EvalSet:
    """Inputs and what an analysis conditions on (shapes: N examples).

    Attributes:
        inputs: ``[N, D]`` vectors, ``[N, C, H, W]`` images or ``[N, S]`` token ids (int64).
        labels: ``[N]`` class per example, or ``[N, S]`` per token; ``class_names`` name them and
            ``label_name`` says what they are (``"digit"``, ``"character class"``).
        targets: one tensor ``[N, ...]`` per task of a multi-task model.
        route_meta: per-example routing metadata given to the forward, ``{key: [N]}``.
        groups: categorical per-example or per-token fields ``{key: [N] or [N, S]}``; ``group_names``
            optionally names each group's values.
        name, description: shown in the report (what the data is and where it comes from).
    """

    inputs: Tensor
    labels: Tensor | None = None
    targets: tuple[Tensor, ...] = ()
    route_meta: dict[str, Tensor] = field(default_factory=dict)
    groups: dict[str, Tensor] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    group_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    name: str = "data"
    description: str = ""
    label_name: str = "label"

    def __post_init__(self) -> None:
        n = self.inputs.shape[0] if self.inputs.dim() else 0
        if n == 0:
            raise ValueError(f"an EvalSet needs at least one example, got inputs of shape {tuple(self.inputs.shape)}")
        fields = {"labels": self.labels, **{f"targets[{i}]": t for i, t in enumerate(self.targets)},
                  **{f"route_meta[{k!r}]": v for k, v in self.route_meta.items()},
                  **{f"groups[{k!r}]": v for k, v in self.groups.items()}}  # fmt: skip
        for what, value in fields.items():
            if value is not None and (value.dim() == 0 or value.shape[0] != n):
                raise ValueError(f"{what} has shape {tuple(value.shape)}; the inputs have {n} examples")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def kind(self) -> str:
        """``"tokens"`` (integer ``[N, S]``), ``"images"`` (``[N, C, H, W]``) or ``"vectors"``."""
        if not self.inputs.is_floating_point() and self.inputs.dim() == 2:
            return "tokens"
        return "images" if self.inputs.dim() == 4 else "vectors"

    def take(self, index: Tensor | slice) -> "EvalSet":
        """The examples ``index`` (e.g. ``slice(0, 100)``); the description says how many were kept."""
        n = self.inputs[index].shape[0]
        description = self.description if n == len(self) else f"{self.description}; {n} of them analysed"
        return EvalSet(
            self.inputs[index], None if self.labels is None else self.labels[index],
            tuple(t[index] for t in self.targets), {k: v[index] for k, v in self.route_meta.items()},
            {k: v[index] for k, v in self.groups.items()}, self.class_names, dict(self.group_names), self.name,
            description, self.label_name,
        )  # fmt: skip

    def spread(self, n: int) -> "EvalSet":
        """``n`` examples evenly spaced over the set (all when it has no more), so that data ordered by
        class or domain keeps every class and domain."""
        if n >= len(self):
            return self
        return self.take(torch.linspace(0, len(self) - 1, n).round().long().unique())

    @classmethod
    def from_tokens(
        cls,
        ids_NS: Tensor,
        *,
        token_text: Callable[[int], str] | Sequence[str] | None = None,
        name: str = "tokens",
        description: str = "",
    ) -> "EvalSet":
        """A language-model set from token ids ``[N, S]``: label = character class of each token, group
        ``"token"`` = its id. ``token_text(id)`` (or a sequence indexed by id) gives a token's text
        (default: the byte with that value)."""
        ids = torch.as_tensor(ids_NS).long()
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty [N, S] tensor, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0:
            raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
        vocab = int(ids.max()) + 1
        if token_text is None:  # bytes: non-ASCII bytes (parts of UTF-8 characters) are "other"
            text: Callable[[int], str] = chr
            shown: Callable[[int], str] = lambda i: repr(chr(i)) if i < 128 else f"0x{i:02x}"  # noqa: E731
        else:
            text = token_text.__getitem__ if isinstance(token_text, Sequence) else token_text
            shown = lambda i: repr(text(i))  # noqa: E731
        used = ids.unique().tolist()
        classes = torch.zeros(vocab, dtype=torch.long)
        classes[used] = torch.tensor([char_class(text(i)) for i in used])
        names = {i: shown(i) for i in used}
        token_names = tuple(names.get(i, "") for i in range(vocab))
        return cls(ids, labels=classes[ids], groups={"token": ids}, class_names=CHAR_CLASSES,
                   group_names={"token": token_names}, name=name, description=description,
                   label_name="character class")  # fmt: skip

    # ----- file form
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the set to ``path`` (safetensors, atomically)."""
        from safetensors.torch import save

        tensors = {"inputs": self.inputs}
        if self.labels is not None:
            tensors["labels"] = self.labels
        tensors.update({f"targets.{i}": t for i, t in enumerate(self.targets)})
        tensors.update({f"route_meta.{k}": v for k, v in self.route_meta.items()})
        tensors.update({f"groups.{k}": v for k, v in self.groups.items()})
        info = {"version": VERSION, "name": self.name, "description": self.description, "label_name": self.label_name,
                "class_names": list(self.class_names), "group_names": {k: list(v) for k, v in self.group_names.items()}}
        data = save({k: v.detach().cpu().clone() for k, v in tensors.items()},  # clones: groups may alias inputs
                    metadata={EVAL_SET_KEY: json.dumps(info)})  # fmt: skip
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "EvalSet":
        """Read a set written by ``save`` (ValueError for other files)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation set {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
        if EVAL_SET_KEY not in meta or "inputs" not in tensors:
            raise ValueError(f"{str(path)!r} is not a moekit evaluation set (saved with moekit.analysis.EvalSet.save)")
        info = json.loads(meta[EVAL_SET_KEY])

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        targets = part("targets.")
        return cls(
            tensors["inputs"], tensors.get("labels"), tuple(targets[str(i)] for i in range(len(targets))),
            part("route_meta."), part("groups."), tuple(info.get("class_names", ())),
            {k: tuple(v) for k, v in info.get("group_names", {}).items()}, info.get("name", path.stem),
            info.get("description", ""), info.get("label_name", "label"),
        )  # fmt: skip
