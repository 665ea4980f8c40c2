"""The compression pipeline: one path for moekit and Hugging Face MoEs, in memory or streamed.

``run_pipeline(stack, batches, spec)`` processes a model unit by unit (``moekit.merging.stack``):

1. **observe** (only when needed: a global budget, or ``propagate="original"``): every unit runs
   on the cached hidden states with the layer-wise observer (``moekit.merging.observer``) collecting
   the statistics the method declares; hidden states move on through the *original* units.
2. **allocate**: experts kept per block -- uniform, or MC-SMoE's global budget over the method's
   per-expert scores (``allocate_experts``), then fitted to the routing (group-limited routers keep
   equal counts per group and ``top_k`` reachable experts).
3. **compress**, unit by unit: statistics (from step 1, or observed now on the inputs that reach the
   unit), ``method.reduce`` per block (merge / prune), the block written back in the plain or exact
   form; optionally the low-rank + sparse step (``moekit.merging.lowrank``: every block not excluded,
   with layer-wise recovery against the original block's outputs on the inputs that reach it); the
   unit's outputs become the next unit's inputs --
   the outputs of the *compressed* unit with ``propagate="compressed"`` (GPTQ-style, the default of
   ``compress``), of the original unit with ``propagate="original"`` (what M-SMoE and REAP do, the
   default of the merge fronts).

Where weights come from (a ``WeightSource``: the model in memory, or safetensors shards read one unit
at a time), where hidden states live (``Work``: memory, or files for bounded memory and resume) and
where results go (a unit ``writer``) are parameters, so the in-memory fronts (``merge_moekit_model``,
``merge_hf_model``) and streamed ``moekit compress`` run the same code.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..models.lm import MoELM
from ..registry import EXPERT_METHODS
from .adapter import FORMS
from .dominant import allocate_experts
from .lowrank import LowRankOptions, Recovery, compress_block
from .memory import release_memory
from .methods import ExpertMethod, create_method
from .methods.base import reduce_block
from .moekit_blocks import MOEKIT_BLOCKS
from .methods.protection import SUPER_EXPERT_STATISTIC, super_experts
from .observer import BlockObserver, unwrap_batch
from .padding import can_pad, pad_result
from .progress import Progress
from .stack import LayerStack, MoELMStack, WholeModelStack
from .weights import RoutingSpec
from .work import BlockStats, MemoryWork, Work

__all__ = [
    "CompressionSpec",
    "PROPAGATIONS",
    "BUDGETS",
    "WeightSource",
    "run_pipeline",
    "check_request",
    "calibrate",
    "merge_moekit_model",
    "moekit_stack",
    "full_name",
]

BUDGETS = ("global", "uniform")
#: which outputs feed the next unit: the compressed unit's (sequential) or the original unit's
PROPAGATIONS = ("compressed", "original")


@dataclass(frozen=True)
class CompressionSpec:
    """What to do to every MoE block.

    Attributes:
        method: a name in ``moekit.registry.EXPERT_METHODS`` (``"m-smoe"``, ``"frequency"``).
        method_options: the method's keyword options.
        experts: experts kept per block (``budget="uniform"``) or on average over the reduced blocks
            (``"global"``); a float in (0, 1) is the fraction kept: ``E - int(E * (1 - experts))``
            per block (REAP's rounding of the removed count); None keeps every expert.
        budget: ``"global"`` (MC-SMoE's adaptive counts) or ``"uniform"``.
        form: ``"plain"`` (standard block, G-row router) or ``"exact"`` (router unchanged + index map).
        exclude: block names left as they are.
        pad: plain form with different counts per block on a model whose config holds one count:
            pad every block to the largest count with experts the router can never choose (needs a
            router or selection bias); otherwise such a request is refused.
        propagate: ``"compressed"`` or ``"original"`` (see the module docstring).
        lowrank: the low-rank + sparse step (``LowRankOptions``) applied to every block not excluded,
            after merging; None = no such step. Its recovery needs ``propagate="compressed"``.
        protect_super_experts: methods that support it (``ExpertMethod.protects``) never remove the
            super experts found on the original model (``moekit.merging.methods.protection``).
    """

    method: str = "m-smoe"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    experts: int | None = None
    budget: str = "global"
    form: str = "exact"
    exclude: tuple[str, ...] = ()
    pad: bool = False
    propagate: str = "compressed"
    lowrank: LowRankOptions | None = None
    protect_super_experts: bool = True

    def __post_init__(self) -> None:
        check_choice("form", self.form, FORMS)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("propagate", self.propagate, PROPAGATIONS)
        if isinstance(self.experts, float):
            if not 0 < self.experts < 1:
                raise ValueError(f"experts as a fraction must be in (0, 1), got {self.experts!r}")
        elif self.experts is not None:
            check_int("experts", self.experts, low=1)
        if self.lowrank is not None and not isinstance(self.lowrank, LowRankOptions):
            raise TypeError(f"lowrank must be LowRankOptions or None, got {type(self.lowrank).__name__}")
        if self.lowrank is not None and self.lowrank.recover_steps and self.propagate != "compressed":
            raise ValueError(
                "layer-wise recovery (recover_steps > 0) matches each block on the inputs the compressed model "
                f"gives it; it needs propagate='compressed', got propagate={self.propagate!r}"
            )

    def kept(self, num_experts: int) -> int:
        """Experts a block of ``num_experts`` keeps under a uniform budget."""
        assert self.experts is not None
        if isinstance(self.experts, float):
            return max(1, num_experts - int(num_experts * (1 - self.experts)))
        return self.experts

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["method_options"] = dict(self.method_options)
        out["lowrank"] = None if self.lowrank is None else asdict(self.lowrank)
        out["exclude"] = list(self.exclude)
        return out


class WeightSource:
    """Gives units their weights when they are processed (the default: already in memory)."""

    def load(self, stack: LayerStack, names: Sequence[str]) -> None:
        """Materialise the modules ``names`` of ``stack.model``."""

    def release(self, stack: LayerStack, names: Sequence[str]) -> None:
        """Free them again (their structure stays)."""


def full_name(unit: str, relative: str) -> str:
    """A block's name in the model from its unit's name and its name inside the unit."""
    return ".".join(part for part in (unit, relative) if part)


@dataclass
class _Blocks:
    """The MoE blocks of the model, by unit."""

    by_unit: list[list[str]]  # full block names per unit
    relative: dict[str, str]  # full name -> name inside its unit
    experts: dict[str, int]  # original E per block
    routing: dict[str, RoutingSpec]

    @property
    def names(self) -> list[str]:
        return [n for unit in self.by_unit for n in unit]


def _find_blocks(stack: LayerStack) -> _Blocks:
    by_unit, relative, experts, routing = [], {}, {}, {}
    for unit_name in stack.units():
        names = []
        for rel, block in stack.adapter.blocks(stack.unit(unit_name)).items():
            name = full_name(unit_name, rel)
            if stack.adapter.router_outputs(block) != stack.adapter.num_experts(block):
                raise ValueError(f"block {name!r} is already merged (exact form); compress the original model instead")
            names.append(name)
            relative[name] = rel
            experts[name] = stack.adapter.num_experts(block)
            routing[name] = stack.adapter.routing(block, stack.config)
        by_unit.append(names)
    if not relative:
        raise ValueError(f"{type(stack.model).__name__} has no MoE block to compress")
    return _Blocks(by_unit, relative, experts, routing)


def _check_request(spec: CompressionSpec, blocks: _Blocks, stack: LayerStack) -> list[str]:
    """The names of the blocks to reduce; errors for requests that cannot be met."""
    unknown = [n for n in spec.exclude if n not in blocks.experts]
    if unknown:
        raise ValueError(f"exclude names {unknown}, which are not MoE blocks; MoE blocks: {blocks.names}")
    reduced = [n for n in blocks.names if n not in set(spec.exclude)]
    if EXPERT_METHODS.get(spec.method).novices:
        _check_novices(spec, stack)
    if spec.experts is not None and reduced and not isinstance(spec.experts, float):
        check_int("experts", spec.experts, low=1, high=min(blocks.experts[n] for n in reduced))
    if spec.pad and spec.form == "plain" and spec.experts is not None:
        for name in reduced:
            reason = can_pad(blocks.routing[name])
            if reason is not None:
                raise ValueError(f"pad=True (--pad) cannot pad block {name!r}: {reason}; use form='exact' for "
                                 "per-block counts, or budget='uniform'")  # fmt: skip
    if stack.uniform_plain and spec.form == "plain" and spec.experts is not None and not spec.pad:
        if spec.budget != "uniform" or spec.exclude:
            raise ValueError(
                "form='plain' needs budget='uniform' and no excluded blocks (a stock config has one expert count "
                f"for all blocks), got budget={spec.budget!r}, exclude={list(spec.exclude)}; use form='exact' for "
                "per-block counts, or pad=True (--pad) to pad every block to the largest count"
            )
    return reduced


def _check_novices(spec: CompressionSpec, stack: LayerStack) -> None:
    """Methods that replace experts by novices (MoNE) keep the router: the exact form of an adapter
    that can hold novices, and no low-rank step after them."""
    if not stack.adapter.supports_novices:
        raise ValueError(f"method {spec.method!r} replaces pruned experts by novices, which the {stack.adapter.name} "
                         "family cannot hold; use another method")  # fmt: skip
    if spec.form != "exact":
        raise ValueError(f"method {spec.method!r} keeps the router (novices answer for pruned experts); use "
                         f"form='exact' (--form exact), got form={spec.form!r}")  # fmt: skip
    if spec.lowrank is not None:
        raise ValueError(f"method {spec.method!r} keeps novices beside the real experts; the low-rank step "
                         "(--rank) is not offered after it")  # fmt: skip


def _fit_to_routing(counts: dict[str, int], routing: dict[str, RoutingSpec], experts: dict[str, int]) -> dict[str, int]:
    """Counts that group-limited routers can hold: multiples of ``n_group``, at least
    ``min_per_group`` per group, and enough reachable experts for ``top_k``."""
    out = dict(counts)
    for name, G in counts.items():
        spec = routing[name]
        if spec.groups <= 1 or G == experts[name]:
            continue
        n = spec.groups
        lowest = n * max(spec.min_per_group, -(-spec.top_k // spec.topk_group))
        fitted = min(max(n * round(G / n), lowest), experts[name])
        if spec.reachable(fitted) < spec.top_k or fitted % n:
            raise ValueError(
                f"block {name!r} routes group-limited (n_group={n}, topk_group={spec.topk_group}, top_k="
                f"{spec.top_k}): it needs a multiple of {n} experts and at least {lowest}, got {G}"
            )
        out[name] = fitted
    return out


def check_request(stack: LayerStack, spec: CompressionSpec) -> list[str]:
    """Errors of a request that cannot be met on ``stack``, before any work (blocks, expert counts,
    forms, method options, whether the family can hold compressed experts); returns the reduced blocks."""
    create_method(spec.method, **dict(spec.method_options))
    blocks = _find_blocks(stack)
    if spec.lowrank is not None and not stack.adapter.compressible:
        raise ValueError(f"{stack.adapter.name}: compressed experts (--rank) are not supported for this family; "
                         "merge or prune only")  # fmt: skip
    return _check_request(spec, blocks, stack)


class _Run:
    """One pipeline run over a stack (see the module docstring)."""

    def __init__(
        self, stack: LayerStack, spec: CompressionSpec, *, source: WeightSource, work: Work,
        writer: Any = None, verify: Any = None, quiet: bool = True,
    ) -> None:  # fmt: skip
        self.stack, self.spec, self.source, self.work, self.writer = stack, spec, source, work, writer
        self.quiet, self.verify = quiet, verify
        self.method: ExpertMethod = create_method(spec.method, **dict(spec.method_options))
        self.blocks = _find_blocks(stack)
        self.reduced = _check_request(spec, self.blocks, stack)
        self.units = stack.units()
        self.state: dict[str, Any] = work.state() or {"phase": "observe", "unit": 0}
        self.layers: dict[str, dict[str, Any]] = dict(self.state.get("layers", {}))
        self.pad_to: int | None = None
        #: wall time of each unit's compress phase (the units this process ran; resume keeps earlier ones)
        self.unit_seconds: dict[str, float] = dict(self.state.get("unit_seconds", {}))
        self.protected: dict[str, list[int]] = dict(self.state.get("protected", {}))
        self.kept: dict[str, list[int]] = dict(self.state.get("kept", {}))

    # ----- helpers
    def _save_state(self, **changes: Any) -> None:
        self.state.update(changes, layers=self.layers, kept=self.kept)
        self.work.save_state(self.state)

    def _pass(self, index: int, inputs: Any, specs: Mapping[str, Mapping[str, Any]] | None, outputs: Any,
              observed: Sequence[str] = ()) -> BlockStats:  # fmt: skip
        """Run unit ``index`` over every batch, observing ``specs`` on the blocks ``observed``; keep outputs."""
        name = self.units[index]
        rel = [self.blocks.relative[n] for n in observed] if specs else []
        results: BlockStats = {}
        with torch.no_grad():
            if rel:
                with BlockObserver(self.stack.adapter, self.stack.unit(name), self.stack.config, specs or {}, rel) as obs:
                    self._run_batches(index, inputs, outputs, obs)
                results = {full_name(name, r): v for r, v in obs.results().items()}
                never = [n for n, s in results.items() if "counts" in s and float(s["counts"]["counts"].sum()) <= 0]
                if never:
                    raise ValueError(
                        f"the calibration data never reached MoE blocks {never}; give batches that run through them"
                    )
            else:
                self._run_batches(index, inputs, outputs, None)
        return results

    def _run_batches(self, index: int, inputs: Any, outputs: Any, observer: BlockObserver | None) -> None:
        for b in range(self.num_batches):
            if observer is not None:
                observer.set_valid(self.valid[b])
                observer.set_weight(self.batch_weights[b])
            out = self.stack.run(index, inputs.get(b), self.contexts[b])
            if outputs is not None:
                outputs.put(b, out)

    # ----- phases
    def prepare(self, batches: Sequence[Any]) -> None:
        """The first unit's inputs and the per-batch contexts of every calibration batch."""
        if not batches:
            raise ValueError("no calibration batches given; the pipeline needs at least one")
        self.source.load(self.stack, self.stack.context_modules())
        first = self.work.hidden("input")
        self.contexts, self.valid, self.batch_weights = [], [], []
        for b, weighted in enumerate(batches):
            batch, weight = unwrap_batch(weighted)
            self.batch_weights.append(weight)
            hidden, context = self.stack.prepare(batch)
            first.put(b, hidden)
            self.contexts.append(context)
            self.valid.append(self.stack.valid_tokens(batch))
        if self.verify is not None:  # a few tokens that go through the compressed units, to check the output
            hidden, self.verify_context = self.stack.prepare(self.verify)
            self.work.hidden("verify/0").put(0, hidden)
        self.source.release(self.stack, self.stack.context_modules())
        self.num_batches = len(batches)

    def run(self, batches: Sequence[Any]) -> dict[str, Any]:
        start = time.perf_counter()
        self.prepare(batches)
        stats = self.observe(self._observe_specs(), self.reduced) if self._needs_observe() else {}
        if self._protecting() and "protected" not in self.state:
            self.protected = super_experts({n: stats[n][SUPER_EXPERT_STATISTIC] for n in self.reduced}, self.reduced)
            self._save_state(protected=self.protected)
        counts = self._allocate(stats)
        self.pad_to = self._padding(counts)
        if self.writer is not None:
            self.writer.write_trunk()
        self._compress(stats, counts)
        self.stack.finish(self.spec.form, self._record(counts))
        report: dict[str, Any] = {"layers": self.layers, "counts": counts, "seconds": time.perf_counter() - start,
                                  "unit_seconds": self.unit_seconds, "padding_bytes": sum(int(v.get("padding_bytes", 0)) for v in self.layers.values()),
                                  "protected": self.protected if self._protecting() else None, "kept": self.kept}  # fmt: skip
        if self.verify is not None:
            report["expected_logits"] = self._verify_logits()
        return report

    def _verify_logits(self) -> Tensor:
        """The compressed model's logits on the verification tokens (computed unit by unit)."""
        hidden = self.work.hidden(f"verify/{len(self.units)}").get(0)
        self.source.load(self.stack, self.stack.head_modules())
        with torch.no_grad():
            logits = self.stack.logits(hidden, self.verify_context).detach().float().clone()
        self.source.release(self.stack, self.stack.head_modules())
        return logits

    def _protecting(self) -> bool:
        return bool(self.spec.protect_super_experts and self.method.protects and self.reduced and self.spec.experts)

    def _needs_observe(self) -> bool:
        if not self.reduced or self.spec.experts is None:
            return False
        return self.spec.budget == "global" or self.spec.propagate == "original" or self._protecting()

    def _observe_specs(self) -> dict[str, dict[str, Any]]:
        specs = dict(self.method.statistics()) if self.spec.propagate == "original" else {"counts": {}}
        if self.spec.budget == "global":
            specs.update(self.method.budget_statistics())
        if self._protecting():
            specs.setdefault(SUPER_EXPERT_STATISTIC, {})
        return specs

    def observe(self, specs: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, BlockStats]:
        """Phase 1: statistics ``specs`` of the blocks ``names`` on the original model's hidden states."""
        begin = self.state["unit"] if self.state["phase"] == "observe" else len(self.units)
        with Progress(len(self.units), "observe", quiet=self.quiet, initial=begin) as bar:
            for i in range(begin, len(self.units)):
                inputs = self.work.hidden("input" if i == 0 else f"observe/{i}")
                last = i == len(self.units) - 1
                outputs = None if last else self.work.hidden(f"observe/{i + 1}")
                observed = [n for n in self.blocks.by_unit[i] if n in set(names)]
                self.source.load(self.stack, [self.units[i]])
                self.work.save_stats(i, self._pass(i, inputs, specs, outputs, observed))
                self.source.release(self.stack, [self.units[i]])
                self._save_state(phase="observe", unit=i + 1)
                if i > 0:
                    self.work.drop_hidden(f"observe/{i}")
                bar.step(self.units[i] or "model")
        out: dict[str, BlockStats] = {}
        for i in range(len(self.units)):
            out.update(self.work.load_stats(i))
        return out

    def _allocate(self, stats: dict[str, BlockStats]) -> dict[str, int]:
        if "counts" in self.state:
            return dict(self.state["counts"])
        E = self.blocks.experts
        if self.spec.experts is None or not self.reduced:
            counts = dict(E)
        elif self.spec.budget == "global":
            scores = {n: self.method.budget_score(stats[n]) for n in self.reduced}
            counts = {**E, **allocate_experts(scores, total=sum(self.spec.kept(E[n]) for n in self.reduced))}
        else:
            counts = {**E, **{n: self.spec.kept(E[n]) for n in self.reduced}}
        counts = _fit_to_routing(counts, self.blocks.routing, E)
        self._save_state(counts=counts)
        return counts

    def _padding(self, counts: dict[str, int]) -> int | None:
        """The count every reduced block is padded to (plain form with --pad and differing counts)."""
        spec = self.spec
        if not (spec.pad and spec.form == "plain" and self.stack.uniform_plain) or len(set(counts.values())) <= 1:
            return None
        return max(counts.values())

    def _compress(self, stats: dict[str, BlockStats], counts: dict[str, int]) -> None:
        """Phase 2: reduce every unit's blocks, unit by unit."""
        spec = self.spec
        carry = spec.propagate == "compressed"
        begin = self.state["unit"] if self.state["phase"] == "compress" else 0
        with Progress(len(self.units), "compress", quiet=self.quiet, initial=begin) as bar:
            for i in range(begin, len(self.units)):
                unit_start = time.perf_counter()
                name, last = self.units[i], i == len(self.units) - 1
                inputs = self.work.hidden("input" if i == 0 else f"compress/{i}") if carry else None
                to_reduce = [n for n in self.blocks.by_unit[i] if n in self.reduced and counts[n] < self.blocks.experts[n]]
                low = [n for n in self.blocks.by_unit[i] if n not in set(spec.exclude)] if spec.lowrank else []
                self.source.load(self.stack, [name])
                recover = spec.lowrank is not None and spec.lowrank.recover_steps > 0 and low
                targets = self._capture(i, inputs, low) if recover else {}
                unit_stats = stats
                if carry and to_reduce:
                    unit_stats = self._pass(i, inputs, self.method.statistics(), None, to_reduce)
                for block_name in to_reduce:
                    self._reduce(block_name, unit_stats[block_name], counts[block_name])
                release_memory()  # the original experts and the merge's temporaries are freed
                for block_name in low:
                    self._low_rank(block_name, targets.get(block_name))
                if carry and not last:
                    self._pass(i, inputs, None, self.work.hidden(f"compress/{i + 1}"))
                if self.verify is not None:
                    with torch.no_grad():
                        out = self.stack.run(i, self.work.hidden(f"verify/{i}").get(0), self.verify_context)
                    self.work.hidden(f"verify/{i + 1}").put(0, out)
                if self.writer is not None:
                    self.writer.write_unit(i, name, self.stack.unit(name))
                self.source.release(self.stack, [name])
                self.unit_seconds[name] = round(time.perf_counter() - unit_start, 4)
                self._save_state(phase="compress", unit=i + 1, unit_seconds=self.unit_seconds)
                if carry and i > 0:
                    self.work.drop_hidden(f"compress/{i}")
                if self.verify is not None:
                    self.work.drop_hidden(f"verify/{i}")
                bar.step(name or "model")

    def _reduce(self, name: str, stats: BlockStats, G: int) -> None:
        stack, adapter = self.stack, self.stack.adapter
        block = stack.unit(name)
        E = adapter.num_experts(block)
        weights = adapter.read(block, stack.config)
        if name in self.protected:
            mask = torch.zeros(E, dtype=torch.bool)
            mask[self.protected[name]] = True
            stats = {**stats, "protected": {"mask": mask}}
        result = reduce_block(self.method, weights, stats, G, self.blocks.routing[name])
        kept = result.dominant.tolist()
        record: dict[str, Any] = {}
        if result.novice_mask is not None:  # router outputs answered by novices (slot G + j for the j-th)
            record["novices"] = result.novice_mask.nonzero().flatten().tolist()
        if self.pad_to is not None and G < self.pad_to:
            result, cost = pad_result(result, self.pad_to, self.blocks.routing[name])
            record = {"kept_experts": G, "padding": self.pad_to - G, "padding_bytes": cost}
            G = self.pad_to
        new = adapter.write(block, result, self.spec.form, stack.config)
        if new is not block:
            stack.replace(name, new)
        self.layers[name] = {"experts": G, "router_outputs": E if self.spec.form == "exact" else G, **record}
        self.kept[name] = kept

    def _capture(self, index: int, inputs: Any, names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """Inputs and outputs ``([T, D], [T, D])`` of the original blocks ``names`` of unit ``index`` on
        the unit's calibration inputs (real tokens only, at most ``LowRankOptions.recover_pool``)."""
        assert self.spec.lowrank is not None
        pool = self.spec.lowrank.recover_pool
        unit = self.stack.unit(self.units[index])
        seen: dict[str, tuple[list[Tensor], list[Tensor]]] = {n: ([], []) for n in names}
        valid: list[Tensor | None] = [None]

        def hook(name: str) -> Callable[..., None]:
            def on_block(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                x = (args[0] if args else next(iter(kwargs.values()))).detach()
                y = self.stack.adapter.block_output(output).detach()
                x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                if valid[0] is not None and valid[0].numel() == x.shape[0]:
                    x, y = x[valid[0]], y[valid[0]]
                xs, ys = seen[name]
                room = pool - sum(t.shape[0] for t in xs)
                if room > 0:
                    xs.append(x[:room].clone())
                    ys.append(y[:room].clone())

            return on_block

        handles = [unit.get_submodule(self.blocks.relative[n]).register_forward_hook(hook(n), with_kwargs=True)
                   if self.blocks.relative[n] else unit.register_forward_hook(hook(n), with_kwargs=True) for n in names]  # fmt: skip
        try:
            with torch.no_grad():
                for b in range(self.num_batches):
                    valid[0] = self.valid[b]
                    self.stack.run(index, inputs.get(b), self.contexts[b])
        finally:
            for h in handles:
                h.remove()
        return {n: (torch.cat(xs), torch.cat(ys)) for n, (xs, ys) in seen.items() if xs}

    def _low_rank(self, name: str, target: tuple[Tensor, Tensor] | None) -> None:
        """The low-rank + sparse step on block ``name`` (its current, possibly reduced, experts)."""
        assert self.spec.lowrank is not None
        stack, adapter = self.stack, self.stack.adapter
        block = stack.unit(name)
        weights = adapter.read_bank(block, stack.config)
        recovery = None
        if target is not None:
            frozen = [p for p in block.parameters() if p.requires_grad]

            def forward(bank: nn.Module, x_ND: Tensor) -> Tensor:
                module = adapter.write_compressed(block, bank, stack.config)
                out = adapter.block_output(module(x_ND.unsqueeze(0)))
                return out.reshape(-1, out.shape[-1])

            recovery = Recovery(target[0], target[1], forward)
            for p in frozen:
                p.requires_grad_(False)
        try:
            bank = compress_block(weights, self.spec.lowrank, recovery)
        finally:
            if recovery is not None:
                for p in frozen:
                    p.requires_grad_(True)
        new = adapter.write_compressed(block, bank, stack.config)
        if new is not block:
            stack.replace(name, new)
        E = self.blocks.experts[name]
        record = self.layers.setdefault(name, {"experts": E, "router_outputs": E})
        record["compression"] = {"kind": weights.kind, "dim": bank.dim, "hidden": bank.hidden, "activation": bank.activation,
                                 "bias": getattr(bank, "up_bias", None) is not None, **bank.compression_layout()}  # fmt: skip

    def _record(self, counts: dict[str, int]) -> dict[str, Any]:
        return {
            "form": self.spec.form, "method": self.spec.method, "experts": self.spec.experts,
            "budget": self.spec.budget, "layers": self.layers, "kept": self.kept,
            "protected": self.protected if self._protecting() else None,
        }  # fmt: skip


def run_pipeline(
    stack: LayerStack,
    batches: Iterable[Any],
    spec: CompressionSpec,
    *,
    source: WeightSource | None = None,
    work: Work | None = None,
    writer: Any = None,
    verify: Any = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Compress ``stack.model`` (in place) on calibration ``batches``; returns a report
    (``layers``: per reduced block its expert count and router outputs; ``counts``: experts per
    block; with a ``verify`` batch, ``expected_logits``: the compressed model's logits on it).

    ``source`` gives units their weights, ``work`` stores what flows between units (and progress,
    for resume), ``writer`` receives every finished unit (``write_trunk``, ``write_unit``)."""
    run = _Run(stack, spec, source=source or WeightSource(), work=work or MemoryWork(), writer=writer, verify=verify,
               quiet=quiet)  # fmt: skip
    return run.run(list(batches))


def moekit_stack(model: nn.Module, forward: Callable[[nn.Module, Any], Any] | None = None) -> LayerStack:
    """The stack of a moekit model: ``MoELMStack`` for a ``MoELM`` (layer by layer), else the whole model."""
    if isinstance(model, MoELM) and forward is None:
        return MoELMStack(model, MOEKIT_BLOCKS)
    return WholeModelStack(model, MOEKIT_BLOCKS, forward=forward)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    statistics: Mapping[str, Mapping[str, Any]] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    stack: LayerStack | None = None,
    quiet: bool = True,
) -> dict[str, BlockStats]:
    """Statistics of every MoE block of ``model`` on calibration ``batches`` (the model is not changed;
    it runs in eval mode, layer by layer where the stack allows).

    Args:
        model: a moekit model, or a Hugging Face model of a registered family.
        statistics: ``{name: options}`` from ``moekit.registry.STATISTICS`` (default: ``counts`` and
            ``router_logits``).
        forward: ``forward(model, batch)`` (the whole model then runs as one unit).
        stack: how to run the model (default: chosen for the model).

    Returns ``{block name: {statistic: {key: tensor}}}``; raises ValueError naming blocks that the
    data never reached.
    """
    stack = stack or _default_stack(model, forward)
    was_training = stack.model.training
    stack.model.eval()
    try:
        run = _Run(stack, CompressionSpec(), source=WeightSource(), work=MemoryWork(), quiet=quiet)
        run.prepare(list(batches))
        return run.observe(statistics or {"counts": {}, "router_logits": {}}, run.blocks.names)
    finally:
        stack.model.train(was_training)


def _default_stack(model: nn.Module, forward: Callable[[nn.Module, Any], Any] | None) -> LayerStack:
    if MOEKIT_BLOCKS.blocks(model):
        return moekit_stack(model, forward)
    from ..registry import MODEL_KINDS

    return MODEL_KINDS.get("huggingface").stack(model, forward)


def merge_moekit_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    experts: int,
    method: str = "mcsmoe",
    form: str = "exact",
    budget: str = "global",
    exclude: Sequence[str] = (),
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_calib_tokens: int = 8192,
    protect_super_experts: bool = True,
    quiet: bool = False,
    report: dict[str, Any] | None = None,
    **merge_kwargs: Any,
) -> nn.Module:
    """A merged copy of a moekit model (``model`` itself is not modified): M-SMoE through the pipeline.

    Args:
        model: any module containing moekit ``MoE`` layers (mlp/glu banks, top-k or Switch routers);
            a ``MoELM`` runs layer by layer, anything else as one unit through ``forward``.
        calib_batches: calibration batches (e.g. a few hundred training sequences).
        experts: average experts kept per merged layer (``budget="global"``: a shared budget of
            ``experts * merged layers``, each layer's count set by normalised frequencies, the most-used
            expert always kept; ``"uniform"``: exactly this many per layer). 1 <= experts <= E.
        method: a recipe in ``MERGE_METHODS`` (``"mcsmoe"``, ``"prune"``, ``"uniform"``, ``"random"``), or
            another ``EXPERT_METHODS`` name (``"reap"``, ``"hc-smoe"``, ...; ``methods.spec.front_spec``).
        form: ``"exact"`` (router unchanged, index map) or ``"plain"`` (router folded, standard MoE).
        exclude: MoE layer names left unmerged.
        forward: ``forward(model, batch)`` for calibration (default ``model(batch)``).
        max_calib_tokens: router logits/inputs kept per layer for grouping.
        quiet: no progress bar.
        protect_super_experts: keep super experts (methods that support it; not M-SMoE).
        report: a dict that receives the pipeline's report (``counts``, ``kept``, ``protected``, ...).
        merge_kwargs: passed to ``merge_layer`` (``grouping``, ``merge``, ``align``, ``anchor``, ``fold``, ``seed``)
            or the method's options.

    Statistics come from the unmerged model (``propagate="original"``), as in the paper.
    """
    from .methods.spec import front_spec

    spec = front_spec(method, merge_kwargs, experts=experts, budget=budget, form=form, exclude=exclude,
                      max_tokens=max_calib_tokens, protect_super_experts=protect_super_experts)  # fmt: skip
    if not MOEKIT_BLOCKS.blocks(model):
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer to merge")
    out = copy.deepcopy(model)
    was_training = out.training
    stack = moekit_stack(out.eval(), forward)
    result = run_pipeline(stack, calib_batches, spec, quiet=quiet)
    if report is not None:
        report.update(result)
    return stack.model.train(was_training)
