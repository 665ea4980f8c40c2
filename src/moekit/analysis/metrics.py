"""Utilisation and specialisation metrics of one routed layer (Pavlitska et al.,
https://arxiv.org/abs/2204.10598, Sec. IV: importance, CV, living experts, co-activation, class x
expert gate table; plus entropy and mutual information between expert choice and labels/metadata).

All functions are pure; ``analyze_layer`` applies them to a ``LayerRecord``. The shared statistics
(coefficient of variation, living experts, entropy) are defined once, in ``moekit.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..stats import LIVING_THRESHOLD, coefficient_of_variation, living_experts, used_experts
from .collect import LayerRecord

__all__ = [
    "LayerAnalysis",
    "coefficient_of_variation",
    "living_experts",
    "used_experts",
    "LIVING_THRESHOLD",
    "mutual_information",
    "label_entropy",
    "class_expert_table",
    "top1_choice",
    "joint_counts",
    "analyze_layer",
    "embed_logits",
    "expert_top_values",
    "load_shares",
]

def mutual_information(joint_AB: Tensor) -> float:
    """Mutual information (nats) of two discrete variables from their joint counts ``[A, B]``."""
    p = joint_AB.double()
    total = float(p.sum())
    if total <= 0:
        return math.nan
    p = p / total
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] / outer[nz])).sum())


def label_entropy(labels_T: Tensor) -> float:
    """Entropy (nats) of the empirical distribution of integer labels."""
    counts = torch.bincount(labels_T.long()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log(p)).sum())


def top1_choice(gates_TE: Tensor) -> Tensor:
    """Each token's main expert: the one with the largest gate weight ``[T]``."""
    return gates_TE.argmax(dim=-1)


def joint_counts(a_T: Tensor, b_T: Tensor, num_a: int, num_b: int) -> Tensor:
    """Contingency table ``[num_a, num_b]`` of two integer sequences."""
    return torch.bincount(a_T.long() * num_b + b_T.long(), minlength=num_a * num_b).reshape(num_a, num_b).double()


def class_expert_table(gates_TE: Tensor, labels_T: Tensor, num_labels: int | None = None) -> Tensor:
    """Mean gate weight per (label, expert) ``[L, E]`` (the paper's Table III); NaN rows for absent labels."""
    L = int(labels_T.max()) + 1 if num_labels is None else num_labels
    sums = torch.zeros(L, gates_TE.shape[1], dtype=torch.float64).index_add_(0, labels_T.long(), gates_TE.double())
    counts = torch.bincount(labels_T.long(), minlength=L).double().unsqueeze(1)
    return sums / counts


def load_shares(gates_TE: Tensor, *, slices: int = 16) -> Tensor:
    """Each expert's share of the routed slots in ``slices`` consecutive, equal slices of the tokens
    (in data order): ``[slices, E]``, rows summing to 1 (fewer slices when there are few tokens)."""
    chosen = (gates_TE > 0).double()
    n = min(slices, chosen.shape[0] // 2)
    if n < 1:
        return torch.zeros(0, gates_TE.shape[1])
    per = chosen.shape[0] // n
    counts = chosen[: n * per].reshape(n, per, -1).sum(1)
    return (counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)).float()


def expert_top_values(
    choice_T: Tensor, values_T: Tensor, num_experts: int, *, top: int = 6, min_share: float = 0.005
) -> list[list[dict[str, float]]]:
    """Per expert, the values most over-represented among the tokens whose main expert it is:
    ``lift = P(value | expert) / P(value)``, among values with at least ``max(3, min_share * n_e)`` of
    the expert's ``n_e`` tokens. Returns ``[E]`` lists of ``{"value", "count", "share", "lift"}``."""
    values = values_T.long()
    V = int(values.max()) + 1 if values.numel() else 1
    joint = joint_counts(choice_T, values, num_experts, V)  # [E, V]
    p_value = joint.sum(0) / joint.sum().clamp_min(1)
    out = []
    for e in range(num_experts):
        n_e = float(joint[e].sum())
        if n_e == 0:
            out.append([])
            continue
        share = joint[e] / n_e
        lift = share / p_value.clamp_min(1e-12)
        ok = (joint[e] >= max(3.0, min_share * n_e)).nonzero().flatten()
        best = ok[lift[ok].argsort(descending=True)][:top]
        out.append([{"value": int(v), "count": int(joint[e, v]), "share": float(share[v]), "lift": float(lift[v])}
                    for v in best.tolist()])  # fmt: skip
    return out


#: groups with at most this many distinct values get a value x expert table (and a heatmap)
MAX_TABLE_VALUES = 40


@dataclass
class LayerAnalysis:
    """Metrics of one layer. ``mutual_info`` maps ``"label"`` and each metadata key to
    ``{"mi": nats, "nmi": mi / H(variable)}`` for the top-1 expert choice; ``group_tables`` holds the
    mean gate per (value, expert) of each metadata key with few values; ``top_values`` the values each
    expert over-represents (``expert_top_values``) for metadata keys with many values (e.g. tokens);
    ``load_share`` the share of slots per expert in consecutive slices of the data (``load_shares``);
    ``entropy_values`` per-token router entropies."""

    name: str
    tokens: int
    num_experts: int
    mean_gate: Tensor
    counts: Tensor
    cv_importance: float
    cv_counts: float
    entropy: float
    living_experts: int
    coactivation: Tensor
    class_table: Tensor | None
    mutual_info: dict[str, dict[str, float]] = field(default_factory=dict)
    group_tables: dict[str, Tensor] = field(default_factory=dict)
    top_values: dict[str, list[list[dict[str, float]]]] = field(default_factory=dict)
    load_share: Tensor | None = None
    entropy_values: Tensor | None = None

    @property
    def max_entropy(self) -> float:
        """log E: the entropy of a router that cannot decide (uniform over experts)."""
        return math.log(self.num_experts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "num_experts": self.num_experts,
            "mean_gate": self.mean_gate.tolist(),
            "counts": self.counts.tolist(),
            "cv_importance": self.cv_importance,
            "cv_counts": self.cv_counts,
            "entropy": self.entropy,
            "living_experts": self.living_experts,
            "coactivation": self.coactivation.tolist(),
            "class_table": None if self.class_table is None else self.class_table.tolist(),
            "mutual_info": self.mutual_info,
            "group_tables": {k: v.tolist() for k, v in self.group_tables.items()},
            "top_values": self.top_values,
            "load_share_per_slice": None if self.load_share is None else self.load_share.tolist(),
            "max_entropy": self.max_entropy,
        }


def _mi(choice_T: Tensor, values_T: Tensor, num_experts: int) -> dict[str, float]:
    values = values_T.long()
    if values.numel() == 0 or int(values.min()) < 0:
        raise ValueError("labels and metadata for mutual information must be non-negative integers")
    joint = joint_counts(values, choice_T, int(values.max()) + 1, num_experts)
    mi, h = mutual_information(joint), label_entropy(values)
    return {"mi": mi, "nmi": mi / h if h > 0 else math.nan}


def analyze_layer(record: LayerRecord, *, num_labels: int | None = None) -> LayerAnalysis:
    """Every metric of one layer; per-label/metadata metrics use the record's kept per-token rows."""
    stats = record.stats
    mean_gate = stats.mean_gate_E().float()
    choice = top1_choice(record.gates_TE)
    mutual = {}
    class_table = None
    if record.labels_T is not None and record.labels_T.numel():
        mutual["label"] = _mi(choice, record.labels_T, record.num_experts)
        class_table = class_expert_table(record.gates_TE, record.labels_T, num_labels).float()
    tables, tops = {}, {}
    if record.labels_T is not None and record.labels_T.numel():
        tops["label"] = expert_top_values(choice, record.labels_T, record.num_experts)
    for key, values in record.meta_T.items():
        mutual[key] = _mi(choice, values, record.num_experts)
        if int(values.max()) < MAX_TABLE_VALUES:
            tables[key] = class_expert_table(record.gates_TE, values).float()
        else:
            tops[key] = expert_top_values(choice, values, record.num_experts)
    return LayerAnalysis(
        name=record.name,
        tokens=stats.tokens,
        num_experts=record.num_experts,
        mean_gate=mean_gate,
        counts=stats.counts_E.float(),
        cv_importance=coefficient_of_variation(stats.importance_E),
        cv_counts=coefficient_of_variation(stats.counts_E),
        entropy=stats.entropy_sum / stats.entropy_tokens if stats.entropy_tokens else math.nan,
        living_experts=living_experts(mean_gate),
        coactivation=stats.coactivation_EE.float(),
        class_table=class_table,
        mutual_info=mutual,
        group_tables=tables,
        top_values=tops,
        load_share=load_shares(record.gates_TE),
        entropy_values=None if record.entropy_T is None else record.entropy_T.float(),
    )


def embed_logits(logits_TE: Tensor, *, max_points: int = 1000, seed: int = 0) -> Tensor:
    """2-D t-SNE embedding (scikit-learn) of the first ``max_points`` rows of router logits ``[T, E]``
    -> ``[n, 2]``. Raises ValueError with fewer than 5 rows."""
    from sklearn.manifold import TSNE

    x = logits_TE[:max_points].double().numpy()
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 logit rows, got {n}")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500)
    return torch.from_numpy(tsne.fit_transform(x)).float()
