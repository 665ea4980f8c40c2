"""The layer-wise observer: statistics of MoE blocks collected while a unit of the model runs.

A method names the statistics it needs (``{name: options}``, names in ``moekit.registry.STATISTICS``,
built-ins in ``moekit.merging.statistics``); ``BlockObserver`` installs the block adapter's hooks
on every MoE block of a unit, turns each block call into a ``BlockCall`` and feeds it to one
``Statistic`` instance per (block, name). Accumulators are bounded: running sums, the first
``max_tokens`` rows of a matrix, maxima. A new statistic is one ``Statistic`` subclass registered
with ``@STATISTICS.register(name)``.

``BlockCall`` holds what one forward of one block saw -- its input tokens, the routing its experts
really received (ids into the bank, gates after renormalisation, biases, group limits and scaling;
capacity-dropped slots masked), the router's logits and scores -- and computes expert inputs,
hidden units and outputs on demand (once per call, shared by all statistics), from the block's
weights in moekit layout (``ExpertLayerWeights``). Padding tokens are removed before statistics see
the call (``set_valid``).

Several calibration sets can be mixed with explicit weights (``mix_calibration``): every batch carries
a per-token weight (``WeightedBatch``), sums become weighted sums and reservoir samples weighted
samples, so each set contributes in proportion to its weight whatever its size (REAP issue #6: with
several sets only the last one counted).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..registry import STATISTICS
from .adapter import BlockAdapter
from .weights import ExpertLayerWeights, RoutingSpec

__all__ = ["BlockCall", "ExpertIO", "Statistic", "BlockObserver", "make_statistic", "WeightedBatch",
           "mix_calibration", "unwrap_batch"]  # fmt: skip


@dataclass(frozen=True)
class WeightedBatch:
    """A calibration batch whose tokens count ``weight`` times in every statistic (``weight >= 0``)."""

    batch: Any
    weight: float


def unwrap_batch(batch: Any) -> tuple[Any, float]:
    """``(batch, weight)``: a ``WeightedBatch`` unpacked, any other batch with weight 1."""
    return (batch.batch, float(batch.weight)) if isinstance(batch, WeightedBatch) else (batch, 1.0)


def _tokens(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return batch["input_ids"].numel()
    return 1


def mix_calibration(sets: Sequence[tuple[Sequence[Any], float]]) -> list[WeightedBatch]:
    """Batches of several calibration sets, weighted so that set s contributes ``w_s / sum(w)`` of
    every statistic whatever its size: a token of set s weighs ``(w_s / sum w) * N / N_s`` (N_s its
    tokens, N all tokens), so the mean token weight stays 1 and an unweighted mix of equal-sized sets
    is unchanged. ``sets``: ``[(batches, weight), ...]``, weights > 0."""
    if not sets:
        raise ValueError("mix_calibration needs at least one (batches, weight) pair, got none")
    sizes = []
    for i, (batches, weight) in enumerate(sets):
        if not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"weight of calibration set {i} must be a finite number > 0, got {weight!r}")
        n = sum(_tokens(b) for b in batches)
        if n == 0:
            raise ValueError(f"calibration set {i} has no batches")
        sizes.append(n)
    total_w, total_n = sum(float(w) for _, w in sets), sum(sizes)
    return [
        WeightedBatch(b, float(w) / total_w * total_n / n)
        for (batches, w), n in zip(sets, sizes)
        for b in batches
    ]


@dataclass(frozen=True)
class ExpertIO:
    """One expert on the tokens routed to it in one call (fp32): ``token_N`` (row in the call),
    ``slot_N`` (its top-k slot), ``gate_N`` (gate weight), ``x_ND`` (input), ``h_NF`` (hidden
    units, the input of ``down_proj``), ``y_ND`` (output of ``down_proj``, bias included)."""

    token_N: Tensor
    slot_N: Tensor
    gate_N: Tensor
    x_ND: Tensor
    h_NF: Tensor
    y_ND: Tensor


@dataclass
class BlockCall:
    """One forward of one MoE block (tokens T, bank experts G, router outputs E).

    Attributes:
        x_TD: the block's input tokens.
        ids_TK: experts the bank ran, int64 in ``[0, G)``.
        weights_TK: the gates their outputs were multiplied by.
        kept_TK: bool mask of slots that ran (capacity drops), None = all.
        logits_TE: the router's logits (fp32) or None.
        routing: the block's ``RoutingSpec`` (score function, top-k, ...).
        router_ids_TK: the router's own choices in ``[0, E)`` (differs from ``ids_TK`` in the exact form).
        num_experts: G.
        sample_weight: weight of every token of this call (calibration mixing; 1 by default).
    """

    x_TD: Tensor
    ids_TK: Tensor
    weights_TK: Tensor
    kept_TK: Tensor | None
    logits_TE: Tensor | None
    routing: RoutingSpec
    num_experts: int
    router_ids_TK: Tensor | None = None
    weights_fn: Callable[[], ExpertLayerWeights] | None = None
    sample_weight: float = 1.0
    _io: dict[int, ExpertIO] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.x_TD.shape[0]

    @property
    def probs_TE(self) -> Tensor | None:
        """The router's per-expert scores (softmax or sigmoid of the logits), fp32."""
        return None if self.logits_TE is None else self.routing.probabilities(self.logits_TE)

    def kept_mask(self) -> Tensor:
        return torch.ones_like(self.ids_TK, dtype=torch.bool) if self.kept_TK is None else self.kept_TK

    def counts(self) -> Tensor:
        """Kept slots per bank expert: fp64 ``[G]``."""
        ids = self.ids_TK[self.kept_mask()]
        return torch.bincount(ids.cpu(), minlength=self.num_experts).double()

    def routed(self, e: int) -> tuple[Tensor, Tensor]:
        """``(token_N, slot_N)``: the kept slots that sent a token to expert ``e``."""
        token, slot = torch.nonzero((self.ids_TK == e) & self.kept_mask(), as_tuple=True)
        return token, slot

    @property
    def weights(self) -> ExpertLayerWeights:
        if self.weights_fn is None:
            raise ValueError("this BlockCall has no expert weights; the observer was built without them")
        return self.weights_fn()

    @torch.no_grad()
    def expert_io(self, e: int) -> ExpertIO:
        """Expert ``e`` run on its routed tokens (computed once per call)."""
        if e not in self._io:
            token, slot = self.routed(e)
            x = self.x_TD[token].float()
            w = self.weights
            h = w.hidden(x, e)
            self._io[e] = ExpertIO(token, slot, self.weights_TK[token, slot].float(), x, h, w.down(h, e))
        return self._io[e]

    def select(self, rows_T: Tensor) -> "BlockCall":
        """The call restricted to token rows ``rows_T`` (bool ``[T]``), e.g. without padding."""
        pick = lambda t: None if t is None else t[rows_T]  # noqa: E731
        return BlockCall(
            self.x_TD[rows_T], self.ids_TK[rows_T], self.weights_TK[rows_T], pick(self.kept_TK),
            pick(self.logits_TE), self.routing, self.num_experts, pick(self.router_ids_TK), self.weights_fn,
            self.sample_weight,
        )  # fmt: skip

    def router_choices(self) -> Tensor:
        """The router's own choices ``[T, K]`` in ``[0, E)`` (the bank's ids when it did not say)."""
        return self.ids_TK if self.router_ids_TK is None else self.router_ids_TK


class Statistic(abc.ABC):
    """A running accumulator of one quantity of one MoE block.

    Built by the observer as ``cls(num_experts=G, dim=D, **options)``; ``update`` sees every call of
    the block; ``result`` returns ``{key: tensor}`` (what the pipeline stores between passes and
    hands to the method). Keep memory bounded: sums, maxima, or the first rows up to a limit.
    """

    def __init__(self, num_experts: int, dim: int) -> None:
        self.num_experts, self.dim = num_experts, dim

    @abc.abstractmethod
    def update(self, call: BlockCall) -> None:
        """Accumulate one call of the block."""

    @abc.abstractmethod
    def result(self) -> dict[str, Tensor]:
        """The accumulated values, CPU tensors."""


def make_statistic(name: str, num_experts: int, dim: int, options: Mapping[str, Any]) -> Statistic:
    """A registered statistic (``moekit.registry.STATISTICS``) for one block."""
    return STATISTICS.get(name)(num_experts=num_experts, dim=dim, **dict(options))


class BlockObserver:
    """Collects statistics for the MoE blocks of one unit while it runs (context manager).

    Args:
        adapter: the family's block adapter.
        unit: the module that runs (a decoder layer, or the whole model).
        config: the model config (for the adapter).
        specs: ``{statistic name: options}``.
        blocks: names (relative to ``unit``) of the blocks to observe (default: all).

    ``results()`` -> ``{block name: {statistic name: {key: tensor}}}``.
    """

    def __init__(
        self,
        adapter: BlockAdapter,
        unit: nn.Module,
        config: Any,
        specs: Mapping[str, Mapping[str, Any]],
        blocks: list[str] | None = None,
    ) -> None:
        found = adapter.blocks(unit)
        names = list(found) if blocks is None else list(blocks)
        self.adapter, self.config, self.specs = adapter, config, dict(specs)
        self.blocks = {n: found[n] for n in names}
        self.stats: dict[str, dict[str, Statistic]] = {}
        self._weights: dict[str, ExpertLayerWeights] = {}
        self._valid: Tensor | None = None
        self._weight = 1.0
        self._handles: list[Any] = []

    def set_valid(self, valid_T: Tensor | None) -> None:
        """Mask of real tokens of the next forward (flattened ``[B * S]``); None = all are real."""
        self._valid = None if valid_T is None else valid_T.reshape(-1).bool()

    def set_weight(self, weight: float) -> None:
        """Weight of every token of the next forward (``WeightedBatch.weight``)."""
        self._weight = float(weight)

    def __enter__(self) -> "BlockObserver":
        for name, block in self.blocks.items():
            self._handles += self.adapter.observe(block, self.config, self._sink(name, block))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _sink(self, name: str, block: nn.Module) -> Callable[[BlockCall], None]:
        def weights() -> ExpertLayerWeights:
            if name not in self._weights:
                self._weights[name] = self.adapter.read(block, self.config)
            return self._weights[name]

        def sink(call: BlockCall) -> None:
            call.weights_fn = weights
            call.sample_weight = self._weight
            if self._valid is not None and self._valid.numel() == call.num_tokens and not bool(self._valid.all()):
                call = call.select(self._valid.to(call.x_TD.device))
            if name not in self.stats:
                G, D = call.num_experts, call.x_TD.shape[-1]
                self.stats[name] = {s: make_statistic(s, G, D, opts) for s, opts in self.specs.items()}
            for stat in self.stats[name].values():
                stat.update(call)

        return sink

    def results(self) -> dict[str, dict[str, dict[str, Tensor]]]:
        """Statistics of every observed block; raises ValueError naming blocks that never ran."""
        never = [n for n in self.blocks if n not in self.stats]
        if never:
            raise ValueError(f"the calibration data never reached MoE blocks {never}; give batches that run through them")
        return {n: {s: stat.result() for s, stat in self.stats[n].items()} for n in self.blocks}
