"""Expert bank: E experts whose parameters are stacked along a leading expert axis.

A bank exposes these ways to run (DESIGN.md, "Experts"):
  * ``grouped_forward``: rows sorted into groups, each group with its own parameters -- the fast
    path behind sparse dispatch (groups = experts) and SMEAR (groups = examples, merged params);
  * ``expert_inference``: one expert, forward only, with the fastest kernel for its weights
    (optionally oneDNN-packed, ``inference_matrices``) -- the inference path of sparse dispatch
    (``inference.py``); banks without it run ``grouped_forward`` under ``no_grad`` instead;
  * ``forward_dense``: every expert on every token (oracle, ensembles);
  * ``merge_parameters``: per-example weighted averages of the stacked parameters (SMEAR), and
    ``forward_merged`` where a bank fuses the merge into its matmuls.
``expert_forward`` runs one expert with plain ops and is the reference every fast path is tested against.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int
from .inference import FFNWeights, InferencePack

__all__ = ["ExpertBank", "ACTIVATIONS", "activation_fn", "init_stacked_linear"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[check_choice("activation", name, ACTIVATIONS)]


def init_stacked_linear(weight_EOI: Tensor, bias_EO: Tensor | None = None) -> None:
    """nn.Linear's default init, applied to each expert's ``[O, I]`` slice."""
    fan_in = weight_EOI.shape[-1]
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight_EOI.uniform_(-bound, bound)  # == kaiming_uniform(a=sqrt(5)) of nn.Linear
        if bias_EO is not None:
            bias_EO.uniform_(-bound, bound)


class ExpertBank(nn.Module):
    """Base class. Subclasses register stacked parameters (leading dim E) and implement
    ``grouped_forward`` and ``expert_forward``.

    Token banks take ``x`` of shape ``[..., dim]``; image banks (conv) take ``[N, C, H, W]``.
    """

    #: whether inputs are token vectors ``[..., dim]`` (True) or whole images ``[N, C, H, W]`` (False)
    token_input: bool = True

    def __init__(self, num_experts: int, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.dim = check_int("dim", dim, low=1)
        self.out_dim = dim if out_dim is None else check_int("out_dim", out_dim, low=1)

    # ----- parameters -------------------------------------------------------------------
    def stacked_parameters(self) -> dict[str, Tensor]:
        """Every parameter of the bank by name, each ``[E, ...]``."""
        return dict(self.named_parameters(recurse=False))

    def expert_parameters(self, e: int) -> dict[str, Tensor]:
        """Expert ``e``'s parameters, each with a group axis of size 1."""
        return {name: p[e : e + 1] for name, p in self.stacked_parameters().items()}

    def merge_parameters(self, probs_BE: Tensor) -> dict[str, Tensor]:
        """Per-example merged parameters: ``sum_e probs[b, e] * theta_e``, each ``[B, ...]``.

        One ``[B, E] @ [E, P]`` matmul per stacked parameter over its flattened experts (SMEAR,
        Muqeeth et al. 2023). Per parameter rather than over one concatenation: concatenating copies
        every expert's weights on each call, and slicing one product makes backward materialise a
        ``[B, sum P]`` zero tensor per parameter (2.5x slower for FFN experts, measured).
        """
        B = probs_BE.shape[0]
        return {
            name: (probs_BE.to(p.dtype) @ p.reshape(self.num_experts, -1)).reshape(B, *p.shape[1:])
            for name, p in self.stacked_parameters().items()
        }

    # ----- running ----------------------------------------------------------------------
    def grouped_forward(self, x_N: Tensor, params: Mapping[str, Tensor], sizes_G: Tensor) -> Tensor:
        """Run group g's parameters (``params[name][g]``) on the ``sizes_G[g]`` consecutive rows of
        group g. ``x_N`` is ``[N, dim]`` (or ``[N, C, H, W]``); returns ``[N, out_dim]`` (or images)."""
        raise NotImplementedError

    def expert_forward(self, x_N: Tensor, e: int) -> Tensor:
        """Reference: expert ``e`` on all rows of ``x_N`` with plain ops (no grouping)."""
        raise NotImplementedError

    #: oneDNN-packed copies of ``inference_matrices`` (set by ``moekit.experts.pack_for_inference``)
    _inference_pack: InferencePack | None = None

    def expert_inference(self, x_N: Tensor, e: int, packed: Mapping[str, Sequence[Tensor]] | None = None) -> Tensor:
        """Forward only: expert ``e`` on the rows ``x_N`` (``[M, dim] -> [M, out_dim]``), reading each of
        its weight matrices once. ``packed`` holds ``inference_matrices`` in oneDNN layout when the bank
        is packed. Banks that do not implement it take ``grouped_forward`` on the inference path."""
        raise NotImplementedError

    #: whether the inference path runs ``grouped_forward`` (one call per matrix) from
    #: ``SORTED_GROUPED_MIN_TOKENS`` tokens on; False: ``expert_inference`` per touched expert at every size
    inference_sorted_gemm: bool = True

    def inference_matrices(self) -> dict[str, list[Tensor]]:
        """The matrices ``expert_inference`` can run packed: ``{name: [[O, I] per expert]}`` (none here)."""
        return {}

    def ffn_weights(self) -> FFNWeights | None:
        """The bank as two stacked matrices around one activation (``FFNWeights``), the form the one-call
        native decode layer runs (``native_gemv.moe_ffn``); None for banks of another form (here)."""
        return None

    def forward_merged(self, x_GSI: Tensor, probs_GE: Tensor, *, chunk_bytes: int) -> Tensor | None:
        """SMEAR's merge-then-run fused into the bank's matmuls (``moekit.experts.merged_linear``): group g's
        ``S`` rows ``x_GSI[g]`` through the expert with parameters ``sum_e probs_GE[g, e] * theta_e``, at
        most ``chunk_bytes`` of merged weights alive at once. ``[G, S, dim] -> [G, S, out_dim]``, or
        ``None`` for banks without a fused path (``merge_parameters`` + ``grouped_forward`` serve them)."""
        return None

    def forward_dense(self, x_T: Tensor) -> Tensor:
        """Every expert on every token: ``[T, E, out...]``."""
        E, T = self.num_experts, x_T.shape[0]
        x_ET = x_T.unsqueeze(0).expand(E, *x_T.shape).reshape(E * T, *x_T.shape[1:])
        sizes = torch.full((E,), T, dtype=torch.long, device=x_T.device)
        y = self.grouped_forward(x_ET, self.stacked_parameters(), sizes)
        return y.reshape(E, T, *y.shape[1:]).transpose(0, 1)

    # ----- shape helpers used by the MoE layer ------------------------------------------
    def as_tokens(self, x: Tensor) -> Tensor:
        """Flatten the input to the bank's token axis: ``[..., D] -> [T, D]`` for token banks."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"input must have last dimension dim={self.dim}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.dim)

    def restore(self, y_T: Tensor, x: Tensor) -> Tensor:
        """Inverse of ``as_tokens`` for the output: ``[T, out_dim] -> [..., out_dim]``."""
        return y_T.reshape(*x.shape[:-1], self.out_dim)

    def router_features(self, x_T: Tensor) -> Tensor:
        """What the router sees for each token: the token itself for token banks."""
        return x_T

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, out_dim={self.out_dim}"
