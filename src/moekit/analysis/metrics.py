"""Utilisation and specialisation metrics of one routed layer (Pavlitska et al.,
https://arxiv.org/abs/2204.10598, Sec. IV: importance, CV, living experts, co-activation, class x
expert gate table; plus entropy and mutual information between expert choice and labels/metadata).

All functions are pure; ``analyze_layer`` applies them to a ``LayerRecord``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .collect import LayerRecord

__all__ = [
    "LayerAnalysis",
    "coefficient_of_variation",
    "living_experts",
    "mutual_information",
    "label_entropy",
    "class_expert_table",
    "top1_choice",
    "joint_counts",
    "analyze_layer",
    "embed_logits",
]

#: an expert is "living" when its mean gate weight exceeds this (the paper's threshold)
LIVING_THRESHOLD = 0.01


def coefficient_of_variation(x_E: Tensor) -> float:
    """Population std / mean over experts (0 = perfectly balanced; NaN when the mean is 0)."""
    x = x_E.double()
    mean = float(x.mean())
    return float(x.std(correction=0)) / mean if mean > 0 else math.nan


def living_experts(mean_gate_E: Tensor, threshold: float = LIVING_THRESHOLD) -> int:
    """Experts whose mean gate weight over tokens exceeds ``threshold``."""
    return int((mean_gate_E > threshold).sum())


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


@dataclass
class LayerAnalysis:
    """Metrics of one layer. ``mutual_info`` maps ``"label"`` and each metadata key to
    ``{"mi": nats, "nmi": mi / H(variable)}`` for the top-1 expert choice."""

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
    tokens = max(stats.tokens, 1)
    mean_gate = (stats.importance_E / tokens).float()
    choice = top1_choice(record.gates_TE)
    mutual = {}
    class_table = None
    if record.labels_T is not None and record.labels_T.numel():
        mutual["label"] = _mi(choice, record.labels_T, record.num_experts)
        class_table = class_expert_table(record.gates_TE, record.labels_T, num_labels).float()
    for key, values in record.meta_T.items():
        mutual[key] = _mi(choice, values, record.num_experts)
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
    )


def embed_logits(logits_TE: Tensor, *, max_points: int = 2000, seed: int = 0) -> Tensor:
    """2-D t-SNE embedding (scikit-learn) of the first ``max_points`` rows of router logits ``[T, E]``
    -> ``[n, 2]``. Raises ValueError with fewer than 5 rows."""
    from sklearn.manifold import TSNE

    x = logits_TE[:max_points].double().numpy()
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 logit rows, got {n}")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return torch.from_numpy(tsne.fit_transform(x)).float()
