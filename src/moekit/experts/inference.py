"""Forward-only sparse dispatch: each touched expert's weights streamed once, no autograd bookkeeping.

``dispatch`` takes this path when no gradient can be asked for (``no_grad`` / ``inference_mode``, or
nothing involved requires grad) and the bank runs one expert at a time (``ExpertBank.expert_inference``).
It computes what the training path computes -- ``y_t = sum_k w_tk * expert_{id_tk}(x_t)`` -- in three steps:

* **one call** (decode): banks whose experts are two matrices around one activation (``ffn_weights``:
  mlp, glu, plain transformers experts) run the whole layer in one native call (``native_gemv.moe_ffn``)
  while the mean rows per touched expert are a size the native GEMV serves; no Python per expert.
* **plan** (``plan_inference``): otherwise the live slots grouped by expert, experts ascending (one token
  with distinct experts: ordered in Python, no sort; more tokens: one stable argsort of the T*K ids).
* **experts**, in runs of consecutive experts (``expert_runs``; on CPU at most ``RUN_BYTES`` of
  temporaries per run, reused from the heap instead of page-faulted in on every call): every touched
  expert's weights are read once per run. On CPU, and for packed banks, a loop over the touched experts
  (``expert_inference``; CPU fp32 on oneDNN over the plain weights, ``reads_plain_weights``); elsewhere,
  from ``SORTED_GROUPED_MIN_TOKENS`` tokens on, the sorted grouped GEMM (``grouped_forward``: the same
  kernels in one call per matrix).
* **combine**: a weighted ``index_add`` of the outputs onto their tokens (per expert in the calling thread,
  per run when the pool ran the experts).

Threads (CPU): with several intra-op threads and at least as many touched experts, the experts are
split over the pool of ``cpu_grouped`` in runs of about equal cost (each worker runs its experts on one
intra-op thread, so every thread streams distinct weights); with fewer experts than threads (a decoding
token on an E=8, K=2 layer) or ``cpu_grouped.MAX_SPLIT_ROWS`` rows per expert or more, each expert's
matrices are split by rows over the intra-op threads of the kernel itself.

Kernels: every bank's ``expert_inference`` applies its matrices through ``expert_linear``, the one seam
that picks the kernel -- the native GEMV (``native_gemv``: C, built on first use; fp32/bf16 weights, and fp16
with F16C, with fp32 accumulation, a GLU's gate activation fused, bf16 on AMX tiles where the CPU has them) where
``native_gemv.serves`` the number of rows (the crossover measured per CPU, ``native_gemv.MAX_ROWS``;
``MOEKIT_NATIVE_GEMV=0`` turns it off), else oneDNN on packed weights (or, fp32, on the plain ones; MKL's
``F.linear`` for large fp32 products on Intel and AVX2 AMD, ``mkl_leads``; bf16 and fp16 without oneDNN kernels for
them on fp32 BLAS over widened weight blocks, ``upcast_gemm``), else ``F.linear``.

Packing (CPU, fp32 and bf16): ``pack_for_inference(module)`` gives each bank a second copy of its expert
matrices in oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), run with
``torch.ops.mkldnn._linear_pointwise`` -- the kernels behind ``torch.compile``'s CPU freezing. On this
machine's AVX-512 cores they stream a matrix at 0.9x the read bandwidth for 1-4 rows and run large
products at twice the FLOP rate of the default fp32 BLAS (MKL), where the plain layout reaches 0.3-0.6x
(``benchmarks/bench_infer.py``). The copy doubles the memory of the expert weights; it is rebuilt when
a parameter changes (optimizer step, ``load_state_dict``) and dropped with ``pack_for_inference(module,
False)``. Without packing, the same path runs ``F.linear`` per expert. Where the native kernel reads panel
copies (``native_gemv.panels_available``: the AVX2 build), a packed two-matrix bank holds those instead for
the one-call layer (``InferencePack.panels``), which then serves prefill sizes too (``PANEL_MAX_ROWS``); the
oneDNN copies are made only when a call runs the expert loop.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_grouped, native_gemv, upcast_gemm
from ..types import RoutingDecision

if TYPE_CHECKING:
    from .base import ExpertBank

__all__ = [
    "FFNWeights",
    "InferencePlan",
    "InferencePack",
    "PACKED_MIN_EXPERT_BYTES",
    "SORTED_GROUPED_MIN_TOKENS",
    "dispatch_inference",
    "expert_linear",
    "inference_applies",
    "pack_for_inference",
    "packing_available",
    "plan_inference",
    "reads_plain_weights",
]

#: unpacked banks off the CPU run the sorted grouped GEMM from this many tokens on (below: the expert loop;
#: equal kernels, the single call wins from 2 tokens on); on CPU the expert loop serves every size
SORTED_GROUPED_MIN_TOKENS = 2
#: packed kernels serve experts of at least this many weight bytes (smaller ones stay in cache, where the
#: per-call cost of oneDNN, ~10 us, outweighs its faster streaming)
PACKED_MIN_EXPERT_BYTES = 2**20
#: batch-size hint for oneDNN's weight layout (measured: 64 and 256 stream best for 1-16 rows)
PACK_HINT = 64
#: rows per oneDNN call: bounds the distinct problem shapes, so its primitive cache stays warm; large enough
#: that a prefill expert is one pass over its weights (256 cost Mixtral bf16 T=1024 8-10%, Intel Xeon)
PACK_TILE_ROWS = 1024
#: bytes of the widest temporary of one run of experts on CPU (prefill): under glibc's largest mmap threshold
#: (32 MiB), so a run's buffers are reused from the heap; larger ones are mapped afresh and page-faulted in
#: on every call (measured: 74K page faults, 22% of a T=1024 call on the Qwen3-30B-A3B layer, fp32, AMD;
#: ~12 us a page on the Intel VM). 24 MiB holds a 1024-row Mixtral expert in bf16 (8 MiB cut it in two)
RUN_BYTES = 24 * 2**20
#: where fp32 products run MKL's GEMM (``mkl_leads``), by ``native_gemv.cpu_profile``, as ``MAX_ROWS``:
#: ``((min features, min rows), ...)``, the first entry whose min features the matrix reaches gives the rows
#: from which MKL runs; every Intel profile (measured on the Xeon) and AMD EPYC with AVX2 only; elsewhere
#: oneDNN at every size
MKL_MIN_ROWS = {**{"GenuineIntel" + isa: ((1, 512),) for isa in ("+AMX", "", "+AVX2", "+portable")},
                "AuthenticAMD+AVX2": ((3584, 256), (1, 64))}  # fmt: skip
#: rows of one expert that cost about one pass over its weights (compute vs memory, for the thread split)
ROWS_PER_WEIGHT_PASS = 16

#: activations oneDNN applies as a post-op of the matmul: name -> (attr, algorithm)
_POST_OPS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "tanh": ("tanh", ""),
             "silu": ("swish", ""), "identity": ("none", "")}  # fmt: skip


def inference_applies(bank: nn.Module, x_T: Tensor, decision: RoutingDecision) -> bool:
    """Whether the forward-only path serves this call: no gradient can be asked for, the bank runs
    experts one at a time, and no graph is being traced (``torch.compile`` keeps the training path)."""
    from .base import ExpertBank

    if type(bank).expert_inference is ExpertBank.expert_inference or torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    params = bank.stacked_parameters().values()
    return not (x_T.requires_grad or decision.weights_TK.requires_grad or any(p.requires_grad for p in params))


@dataclass(frozen=True)
class FFNWeights:
    """A bank whose experts are ``second(act(first x))`` (``ExpertBank.ffn_weights``): what the one-call
    native decode layer (``native_gemv.moe_ffn``) runs.

    Attributes:
        first: ``[E, R, D]`` (``[gate; up]`` with ``glu``, R = 2F; else R = F), nn.Linear layout.
        second: ``[E, O, F]``.
        first_bias / second_bias: ``[E, R]`` / ``[E, O]`` or None.
        glu: the hidden layer is ``act(gate) * up``.
        activation: the activation's name (served when it is one of ``native_gemv.FFN_ACTIVATIONS``).
        first_panels / second_panels: ``native_gemv.pack_panels`` copies of ``first`` / ``second`` (a packed
            bank's, ``InferencePack.panels``) or None.
    """

    first: Tensor
    second: Tensor
    first_bias: Tensor | None = None
    second_bias: Tensor | None = None
    glu: bool = False
    activation: str = "identity"
    first_panels: Tensor | None = None
    second_panels: Tensor | None = None


# ----- plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferencePlan:
    """Live slots grouped by expert.

    Attributes:
        token_N: source token of each slot, ``[N]``, grouped by expert.
        weight_N: combine weight of each slot, ``[N]``.
        groups: ``(expert, first slot, end slot)`` of every touched expert, experts ascending.
    """

    token_N: Tensor
    weight_N: Tensor
    groups: tuple[tuple[int, int, int], ...]


def plan_inference(decision: RoutingDecision) -> InferencePlan:
    """Group the live slots by expert: no sort for one token with distinct experts, else a stable argsort."""
    T, K = decision.ids_TK.shape
    ids, weights = decision.ids_TK.reshape(-1), decision.weights_TK.reshape(-1)
    token = torch.arange(T, device=ids.device).repeat_interleave(K)
    if decision.kept_TK is not None:
        kept = decision.kept_TK.reshape(-1)
        ids, weights, token = ids[kept], weights[kept], token[kept]
    E = decision.num_experts
    if T == 1 and decision.kept_TK is None:
        experts = ids.tolist()
        if len(set(experts)) == len(experts):  # distinct: one slot per group, ordered in Python
            order = sorted(range(K), key=experts.__getitem__)
            return InferencePlan(token, weights[order], tuple((experts[k], i, i + 1) for i, k in enumerate(order)))
    order = torch.argsort(ids, stable=True)
    sizes = torch.bincount(ids, minlength=E)
    groups, start = [], 0
    for e, n in enumerate(sizes.tolist()):
        if n:
            groups.append((e, start, start + n))
            start += n
    return InferencePlan(token[order], weights[order], tuple(groups))


# ----- run --------------------------------------------------------------------------------------
def dispatch_inference(bank: "ExpertBank", x_T: Tensor, decision: RoutingDecision) -> Tensor:
    """``sum_k w_tk * expert_{id_tk}(x_t)`` over live slots, forward only: ``[T, D] -> [T, out_dim]``.

    Two-matrix banks at decode sizes (``native_layer``) run the whole layer in one native call
    (``native_gemv.moe_ffn``). Otherwise the slots go in runs of experts (``expert_runs``, at most
    ``RUN_BYTES`` of temporaries on CPU): on CPU and for packed banks the expert loop (in the calling
    thread each expert's output is added onto its tokens directly; split over the pool, into one buffer
    per run), elsewhere the sorted grouped GEMM from ``SORTED_GROUPED_MIN_TOKENS`` tokens on (same
    kernels, one call per matrix); combined by a weighted ``index_add``."""
    T = x_T.shape[0]
    pack = getattr(bank, "_inference_pack", None)
    panel_pack = pack if pack is not None and native_gemv.panels_available() else None
    packed = None if panel_pack is not None else inference_pack(bank)
    layer = native_layer(bank, x_T, decision, packed=packed is not None, panel_pack=panel_pack)
    if layer is not None:
        return native_gemv.moe_ffn(x_T, decision.ids_TK, decision.weights_TK, layer.first, layer.second, layer.first_bias,
                                   layer.second_bias, kept_TK=decision.kept_TK, glu=layer.glu, activation=layer.activation,
                                   first_panels=layer.first_panels, second_panels=layer.second_panels)  # fmt: skip
    if panel_pack is not None:
        packed = inference_pack(bank)  # the expert loop's oneDNN copies, made on its first call
    # CPU: always the expert loop (F.grouped_mm's CPU kernel copies every expert's weights on each call:
    # 1.1-1.7x the loop's time at 256-1024 rows per expert, bench_infer.py)
    cpu = x_T.device.type == "cpu"
    sorted_gemm = not cpu and packed is None and bank.inference_sorted_gemm and T >= SORTED_GROUPED_MIN_TOKENS
    plan = plan_inference(decision)
    out = x_T.new_zeros(T, bank.out_dim)
    params = bank.stacked_parameters() if sorted_gemm else {}
    max_rows = run_rows(bank, x_T) if cpu else plan.token_N.shape[0]
    for run in expert_runs(plan.groups, max_rows):
        first, end = run[0][1], run[-1][2]
        token, weight = plan.token_N[first:end], plan.weight_N[first:end].to(x_T.dtype).unsqueeze(1)
        x_run = x_T.index_select(0, token)  # plain rows (oneDNN runs a slow kernel on stride-0 views)
        if sorted_gemm:  # the run's experts are ascending in [e0, e1): their stacked parameters are a view
            e0, e1 = run[0][0], run[-1][0] + 1
            counts = [0] * (e1 - e0)
            for e, start, stop in run:
                counts[e - e0] += stop - start
            sizes = torch.tensor(counts, device=x_T.device)
            y = bank.grouped_forward(x_run, {name: p[e0:e1] for name, p in params.items()}, sizes)
            out.index_add_(0, token, y.mul_(weight))
            continue
        pieces = [(e, start - first, stop - first) for e, start, stop in run]
        split = expert_split(pieces, x_T.device)
        if split is None:  # in this thread: each expert's output straight onto its tokens, no copy
            for e, start, stop in pieces:
                y_e = bank.expert_inference(x_run[start:stop], e, packed)
                out.index_add_(0, token[start:stop], y_e * weight[start:stop])
            continue
        y = x_run.new_empty(end - first, bank.out_dim)  # pool workers: their own rows, added once after
        cpu_grouped.run_split(split, lambda g, rows: y[rows].copy_(bank.expert_inference(x_run[rows], pieces[g][0], packed)))
        out.index_add_(0, token, y.mul_(weight))
    return out


def run_rows(bank: "ExpertBank", x_T: Tensor) -> int:
    """Slots per run on CPU: as many as keep the run's widest temporary (``[rows, width]`` of the input,
    a stacked matrix's output or the bank's output) within ``RUN_BYTES``."""
    widths = [bank.dim, bank.out_dim, *(p.shape[1] for p in bank.stacked_parameters().values() if p.dim() == 3)]
    return max(1, RUN_BYTES // (max(widths) * x_T.element_size()))


def expert_runs(groups: Sequence[tuple[int, int, int]], max_rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive ``(expert, first slot, end slot)`` groups cut into runs of at most ``max_rows`` slots. A
    group that fits a run is never cut across two (it opens the next run instead: a cut costs another pass
    over the expert's weights and two smaller GEMMs); a larger one is cut into the fewest pieces that fit,
    of equal size (within a row), each opening a run of its own when the current one cannot take it. (Filling
    the current run first cut Mixtral's fp32 experts of about 1000 rows, 877 a run, into pieces of 22-299 rows
    beside the large ones: 17 products of 8 experts, one in three pieces.)"""
    runs: list[list[tuple[int, int, int]]] = []
    rows = max_rows
    for e, start, end in groups:
        parts = -(-(end - start) // max_rows)
        for i in range(parts):
            a, b = start + (end - start) * i // parts, start + (end - start) * (i + 1) // parts
            if rows + b - a > max_rows:
                runs.append([])
                rows = 0
            runs[-1].append((e, a, b))
            rows += b - a
    return runs


def native_layer(bank: "ExpertBank", x_T: Tensor, decision: RoutingDecision, *, packed: bool,
                 panel_pack: InferencePack | None = None) -> FFNWeights | None:  # fmt: skip
    """The bank's ``FFNWeights`` when the one-call native layer serves this call, else None: a CPU call in
    the weights' dtype, an activation the kernel has, weights with unit column stride, and a mean number
    of rows per touched expert that ``native_gemv.serves`` for both matrices (``packed``: against the
    bank's oneDNN-packed kernels; ``panel_pack``: the bank's pack where the kernel reads panel copies,
    which the layer then brings, served against the packed expert loop, ``native_gemv.PANEL_MAX_ROWS``)."""
    if x_T.device.type != "cpu" or x_T.dim() != 2:
        return None
    ffn = bank.ffn_weights()
    if ffn is None or ffn.activation not in native_gemv.FFN_ACTIVATIONS or x_T.dtype != ffn.first.dtype:
        return None
    if any(t is not None and t.stride(-1) != 1 for t in (ffn.first, ffn.second, ffn.first_bias, ffn.second_bias)):
        return None
    slots = max(1, decision.ids_TK.numel())
    rows = -(-slots // min(decision.num_experts, slots))
    dtype = ffn.first.dtype
    panels = panel_pack is not None
    if not all(native_gemv.serves(rows, dtype, w.shape[2], packed=packed, panels=panels) for w in (ffn.first, ffn.second)):
        return None
    return dataclasses.replace(ffn, **panel_pack.panels(ffn)) if panels else ffn


def expert_split(groups: Sequence[tuple[int, int, int]], device: torch.device) -> cpu_grouped.RowSplit | None:
    """How the experts of ``(expert, first slot, end slot)`` groups go over the CPU pool: runs of about
    equal cost when there are at least as many touched experts as intra-op threads and fewer than
    ``cpu_grouped.MAX_SPLIT_ROWS`` rows per expert on average (larger products parallelise well inside the
    kernel, as in training); None: all in the calling thread (the kernels split each product's rows)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or len(groups) < threads:
        return None
    if groups[-1][2] - groups[0][1] >= cpu_grouped.MAX_SPLIT_ROWS * len(groups):
        return None
    costs = [1.0 + (end - start) / ROWS_PER_WEIGHT_PASS for _, start, end in groups]
    return cpu_grouped.split_by_cost(costs, (*(s for _, s, _ in groups), groups[-1][2]), threads)


# ----- kernels ----------------------------------------------------------------------------------
def packing_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether oneDNN packed kernels serve this dtype on this device (CPU builds with oneDNN; fp32, and
    bf16 where the CPU has it natively)."""
    return torch.device(device).type == "cpu" and _packs_on_cpu(dtype)


def reads_plain_weights(dtype: torch.dtype, rows: int = 1, features: int = 1) -> bool:
    """Whether ``expert_linear`` runs unpacked CPU weights of ``dtype`` on oneDNN rather than ``F.linear``
    for ``rows`` rows: fp32, where torch's ``F.linear`` is MKL and oneDNN reading the plain layout is
    1.1-1.8x faster at every measured size on AMD EPYC with AVX-512 (1-1024 rows of 768-4096 features) and
    on Intel and AVX2 AMD up to ``MKL_MIN_ROWS`` (``mkl_leads``); bf16's ``F.linear`` is oneDNN already."""
    return dtype == torch.float32 and _packs_on_cpu(dtype) and not mkl_leads(dtype, rows, features)


def mkl_leads(dtype: torch.dtype, rows: int, features: int = 1) -> bool:
    """Whether MKL's GEMM (``F.linear`` in fp32) beats oneDNN, packed or plain, for a CPU product of ``rows``
    rows of ``features`` inputs (``MKL_MIN_ROWS`` of this CPU). Intel Xeon: 1024 rows of Mixtral's and Qwen3's
    expert matrices MKL 1.05-1.07x faster, 256 level, 16-64 oneDNN 1.05-1.2x faster. AMD EPYC with AVX2 (Zen
    3), MKL's time over oneDNN's on the plain weights: Qwen3 and OLMoE matrices (768-2048 features) 64 rows
    0.91-0.98, 128 rows 0.84-0.94, 1024 rows 0.79-0.90; Mixtral's (3584-4096) 64 rows 1.05-1.23, 128 rows
    0.99-1.04, 256 rows 0.94-0.96, 1024 rows 0.83."""
    if dtype != torch.float32:
        return False
    for min_features, min_rows in MKL_MIN_ROWS.get(native_gemv.cpu_profile(), ()):
        if features >= min_features:
            return rows >= min_rows
    return False


@functools.cache
def _packs_on_cpu(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class InferencePack:
    """A packed bank's second copy of its expert weights, made on first use and rebuilt when any of the
    bank's parameters or buffers changes: per-expert oneDNN-packed matrices (``matrices``; the expert loop's
    kernels) or, for the one-call native layer where the kernel reads them, panel copies of the two FFN
    matrices (``panels``). Not part of the state dict; a deep copy or pickle of the bank drops it (it is
    rebuilt on the next inference call of the copy)."""

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self._packed: dict[str, list[Tensor]] = {}
        self.expert_bytes = 0  # mean weight bytes of one expert (what one expert's inference streams)
        self._panel_key: tuple | None = None
        self._panels: dict[str, Tensor] = {}

    def panels(self, ffn: FFNWeights) -> dict[str, Tensor]:
        """``{"first_panels": ..., "second_panels": ...}``: ``native_gemv.pack_panels`` of the FFN matrices
        (the first in segments of ``F`` rows for a GLU), rebuilt when either matrix changed."""
        key = _identity((ffn.first, ffn.second))
        if key != self._panel_key:
            self._panels = {}  # the old copies go before the new ones are made
            with torch.no_grad():
                F = ffn.second.shape[2]
                self._panels = {"first_panels": native_gemv.pack_panels(ffn.first, F if ffn.glu else None),
                                "second_panels": native_gemv.pack_panels(ffn.second)}  # fmt: skip
            self._panel_key = key
        return self._panels

    def matrices(self, bank: "ExpertBank") -> dict[str, list[Tensor]]:
        """The packed matrices, ``{name: [packed [O, I] per expert]}``, rebuilt if the bank changed."""
        stamp = _stamp(bank)
        if stamp != self._stamp:
            matrices = bank.inference_matrices()
            with torch.no_grad():
                self._packed = {
                    name: [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_HINT) for w in per_expert]
                    for name, per_expert in matrices.items()
                }
            total = sum(w.numel() * w.element_size() for per_expert in matrices.values() for w in per_expert)
            self.expert_bytes = total // max(1, bank.num_experts)
            self._stamp = stamp
        return self._packed

    def __deepcopy__(self, memo: dict) -> "InferencePack":
        return InferencePack()

    def __getstate__(self) -> dict:
        return {"_stamp": None, "_packed": {}, "expert_bytes": 0, "_panel_key": None, "_panels": {}}


def _stamp(bank: "ExpertBank") -> tuple:
    """What identifies the bank's weights: ``_identity`` of its stacked parameters and buffers."""
    return _identity([*bank.stacked_parameters().values(), *bank.buffers()])


def _identity(tensors: Sequence[Tensor]) -> tuple:
    """Storage, shape, dtype and in-place version of every tensor. Tensors made under ``inference_mode`` keep
    no version counter: theirs is None, so an in-place change of one inside ``inference_mode`` is not seen
    (assigning a new tensor is)."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, tuple(t.shape)) for t in tensors)


def inference_pack(bank: "ExpertBank") -> dict[str, list[Tensor]] | None:
    """The bank's packed matrices when packing is on and serves its dtype, device and expert size, else None."""
    pack = getattr(bank, "_inference_pack", None)
    if pack is None:
        return None
    ref = next(iter(bank.stacked_parameters().values()), None)
    if ref is None or not packing_available(ref.dtype, ref.device):
        return None
    packed = pack.matrices(bank)
    return packed if pack.expert_bytes >= PACKED_MIN_EXPERT_BYTES else None


def pack_for_inference(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn oneDNN packing on (or off, freeing the copies) for every expert bank in ``module`` that has
    packable matrices; returns ``module``. Packing costs a second copy of the expert weights and serves
    CPU fp32/bf16 (``packing_available``); elsewhere the banks keep their plain kernels."""
    from .base import ExpertBank

    banks = [m for m in module.modules() if isinstance(m, ExpertBank) and m.inference_matrices()]
    if enabled and not banks:
        raise ValueError(f"{type(module).__name__} has no expert bank with packable matrices (mlp, glu)")
    for bank in banks:
        bank._inference_pack = InferencePack() if enabled else None
    return module


class InferenceLinear(nn.Linear):
    """An ``nn.Linear`` whose forward, when no gradient is needed, runs on :func:`expert_linear`'s kernels (the
    native GEMV where ``native_gemv.serves`` the rows, oneDNN, BLAS or the widened fp32 blocks above): on CPUs
    where torch's own bf16 / fp32 GEMV streams
    weights below the memory's rate (AMD EPYC Zen 4: ``F.linear`` bf16 12 GB/s, the native kernel 29-31). Same
    parameters, state dict and outputs (within the dtype's rounding); set by :func:`linears_for_inference`."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias  # one attribute lookup each: this runs once a layer and token
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad or x.device.type != "cpu" or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu"):
            return F.linear(x, weight, bias)  # what torch does: autograd, autocast, other devices
        y = expert_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def linears_for_inference(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every plain ``nn.Linear`` of ``module`` (attention projections, dense MLPs, the output layer) on
    moekit's inference kernels when no gradient is needed, in place (each module's class becomes
    :class:`InferenceLinear`; ``enabled=False`` turns them back); returns ``module``. Subclasses of
    ``nn.Linear`` (quantized, LoRA, ...) keep their own forward. Training is unchanged: with gradients the
    forward is ``F.linear``."""
    linears = [m for m in module.modules() if type(m) in (nn.Linear, InferenceLinear)]
    if enabled and not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear to run on moekit's inference kernels")
    for m in linears:
        m.__class__ = InferenceLinear if enabled else nn.Linear
    return module


def expert_linear(
    x_MI: Tensor,
    weight_OI: Tensor,
    bias_O: Tensor | None = None,
    *,
    packed: Tensor | None = None,
    activation: str | None = None,
    act_fn: Callable[[Tensor], Tensor] | None = None,
    glu: bool = False,
) -> Tensor:
    """``act(x @ W^T + b)`` for one expert: ``[M, I] -> [M, O]`` -- the one kernel seam of every bank's
    ``expert_inference`` (mlp, glu, compressed, transformers experts).

    ``glu``: ``W`` is ``[gate; up]`` (``[2F, I]``) and ``act_fn`` maps the ``[M, 2F]`` product to
    ``[M, F]``; ``activation`` names the gate activation where it is one of the standard ones (None: the
    caller's own ``act_fn`` only). Kernels, in order:

    * the native GEMV (``native_gemv``) where ``native_gemv.serves`` the size (decode rows), with a GLU's
      gate activation fused into it when ``activation`` is one it has;
    * with ``packed`` (``weight_OI`` in oneDNN layout) oneDNN in tiles of ``PACK_TILE_ROWS`` rows, the
      activation fused as a post-op when oneDNN has it; the same on the plain contiguous weight in fp32 on
      CPU (``reads_plain_weights``); large fp32 products on MKL's ``F.linear`` where it leads (``mkl_leads``);
    * bf16 (and fp16 from ``upcast_gemm.MIN_ROWS`` rows) on an x86 CPU where oneDNN has no kernels for them
      (AVX2): the weights widened to fp32 block by block and run on fp32 BLAS (``upcast_gemm``), not torch's
      reference loop;
    * otherwise ``F.linear`` then ``act_fn``.
    """
    M, I = x_MI.shape
    if (
        x_MI.device.type == "cpu"
        and weight_OI.stride(-1) == 1
        and native_gemv.serves(M, weight_OI.dtype, I, packed=packed is not None)
        and x_MI.dtype == weight_OI.dtype
    ):
        fuse = glu and activation in native_gemv.GLU_ACTIVATIONS
        y = native_gemv.linear(x_MI, weight_OI, bias_O, glu=activation if fuse else None)
        return y if fuse or act_fn is None else act_fn(y)
    if x_MI.device.type == "cpu":
        if weight_OI.dtype == x_MI.dtype and upcast_gemm.serves(weight_OI.dtype, M):
            y = upcast_gemm.linear_via_fp32(x_MI, weight_OI, bias_O)  # no oneDNN bf16 / fp16 here (AVX2): fp32 BLAS
            return y if act_fn is None else act_fn(y)
        if packed is not None and mkl_leads(weight_OI.dtype, M, I):
            packed = None  # large fp32 products where MKL leads: F.linear on the plain weights
        elif packed is None and reads_plain_weights(weight_OI.dtype, M, I) and weight_OI.is_contiguous():
            packed = weight_OI  # oneDNN takes the plain layout too: 1.1-1.8x the speed of F.linear (MKL) in fp32
    if packed is None:
        y = F.linear(x_MI, weight_OI, bias_O)
        return y if act_fn is None else act_fn(y)
    fused = not glu and (act_fn is None or activation in _POST_OPS)
    attr, algorithm = _POST_OPS[activation if fused and act_fn is not None else "identity"]

    def run(x: Tensor) -> Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias_O, attr, [], algorithm)
        return y if fused else act_fn(y)

    if M <= PACK_TILE_ROWS:
        return run(x_MI)
    return torch.cat([run(x_MI[r : r + PACK_TILE_ROWS]) for r in range(0, M, PACK_TILE_ROWS)])
