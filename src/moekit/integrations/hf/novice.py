"""MoNE novices inside a Hugging Face MoE block (exact form; Zhang et al., ICLR 2026,
https://arxiv.org/abs/2507.00390).

A pruned expert becomes a *novice*: a constant vector ``mu_j [D]`` (its mean output on the calibration
tokens routed to it), returned times its gate wherever the unchanged router chooses it. In the exact
form the block's ``RemappedRouter`` sends router output ``e`` to ``expert_map[e]``: kept experts to
``0 .. G-1``, novices to ``G .. G+N-1``. ``with_novices(experts, novices_ND)`` turns the block's own
experts module (G real experts) into one that takes those ids:

    out[t] = experts(x, ids, gates with novice slots zeroed)[t] + sum_{k: ids[t,k] >= G} gate[t,k] * mu[ids[t,k] - G]

Novice slots reach the stock experts forward as expert 0 with gate 0 (exact: they add nothing), and
tokens whose every slot is a novice skip it. The module keeps its class's forward and tensors
(``gate_up_proj``, ``down_proj``, ...) under the same names -- only its class becomes a subclass
``Novice<Class>`` and it gains the buffer ``novices [N, D]`` -- so the checkpoint's keys and
transformers' on-disk conversions are unchanged and ``<block>.experts.novices`` is one more tensor.
Which router outputs are novices is recorded per block in ``config.moekit_merge`` (``"novices"``: the
router ids, slot ``G + j`` for the j-th), so ``moekit.load_hf_model`` rebuilds the module before loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NoviceMixin", "has_novices", "with_novices"]

_CLASSES: dict[type, type] = {}


class NoviceMixin:
    """The forward of ``Novice<Class>`` (see the module docstring); ``num_experts`` stays G (real experts)."""

    novices: Tensor
    num_experts: int

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``hidden_states [T, D]``, ids ``[T, K]`` in ``[0, G + N)``, gates ``[T, K]`` (positional or by
        the class's own keywords) -> ``[T, D]``."""
        ids_TK, gates_TK = [*args, *kwargs.values()][:2]
        G = int(self.num_experts)
        novice_TK = ids_TK >= G
        real_ids = ids_TK.masked_fill(novice_TK, 0)
        real_gates = gates_TK.masked_fill(novice_TK, 0)
        rows_T = (~novice_TK).any(-1)
        if bool(rows_T.all()):
            out = super().forward(hidden_states, real_ids, real_gates)  # type: ignore[misc]
        else:
            out = torch.zeros_like(hidden_states)
            if bool(rows_T.any()):
                out[rows_T] = super().forward(hidden_states[rows_T], real_ids[rows_T], real_gates[rows_T])  # type: ignore[misc]
        t, k = novice_TK.nonzero(as_tuple=True)
        if t.numel():
            add = gates_TK[t, k].unsqueeze(1).to(self.novices.dtype) * self.novices[ids_TK[t, k] - G]
            out = out.index_add(0, t, add.to(out.dtype))
        return out

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle (``torch.save``, ``copy.deepcopy``) by the stock class: the subclass is rebuilt on load."""
        reduced = list(super().__reduce_ex__(protocol))
        reduced[0], reduced[1] = _new_novice, (_stock_class(type(self)),)
        return tuple(reduced)

    def extra_repr(self) -> str:
        return f"real_experts={self.num_experts}, novices={self.novices.shape[0]}"


def _stock_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not NoviceMixin and not issubclass(c, NoviceMixin))


def _new_novice(stock: type) -> Any:
    """An empty ``Novice<stock>`` instance (unpickling fills its state)."""
    return object.__new__(_novice_class(stock))


def _novice_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Novice{cls.__name__}", (NoviceMixin, cls), {"__module__": __name__,
                                                                        "__doc__": NoviceMixin.__doc__})  # fmt: skip
    return _CLASSES[cls]


def has_novices(experts: nn.Module) -> bool:
    """Whether a block's experts module holds novices."""
    return isinstance(experts, NoviceMixin)


def with_novices(experts: nn.Module, novices_ND: Tensor) -> nn.Module:
    """``experts`` (G real experts, changed in place and returned) with the novices ``[N, D]`` appended
    as ids ``G .. G+N-1``. ``novices_ND`` may live on the meta device (the loader fills it)."""
    if has_novices(experts):
        raise ValueError("this experts module already holds novices; compress the original model instead")
    if novices_ND.dim() != 2 or novices_ND.shape[0] < 1:
        raise ValueError(f"novices must be [N >= 1, D], got {tuple(novices_ND.shape)}")
    experts.__class__ = _novice_class(type(experts))
    experts.register_buffer("novices", novices_ND.detach().clone())
    return experts
