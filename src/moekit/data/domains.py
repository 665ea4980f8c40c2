"""Multi-domain digits: scikit-learn's digits rendered in several visual domains (a DomainNet
analogue with no download). Every digit appears in every domain; the domain is per-image metadata
(``meta_*["domain"]``), and train/test are split by digit so test digits are unseen in every domain.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int
from .images import ImageSplit, upscale_images

__all__ = ["DOMAINS", "render_domain", "load_domain_digits"]


def _blur(x: Tensor) -> Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :]) / 256.0
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.view(1, 1, 5, 5))


def _edges(x: Tensor) -> Tensor:
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    return (gx.square() + gy.square()).sqrt() / 4.0


def _noisy(x: Tensor, gen: torch.Generator) -> Tensor:
    return (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


#: domain name -> renderer of ``[N, 1, S, S]`` images in [0, 1]
DOMAINS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "clean": lambda x, g: x,
    "inverted": lambda x, g: 1.0 - x,
    "rotated": lambda x, g: torch.rot90(x, 1, dims=(2, 3)),
    "noisy": _noisy,
    "blurred": lambda x, g: _blur(_blur(x)),
    "edges": lambda x, g: _edges(x),
}


def render_domain(images: Tensor, domain: str, *, seed: int = 0) -> Tensor:
    """Render ``[N, 1, S, S]`` images (values in [0, 1]) in one domain."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {list(DOMAINS)}, got {domain!r}")
    return DOMAINS[domain](images, torch.Generator().manual_seed(seed))


def load_domain_digits(
    *, domains: Sequence[str] = tuple(DOMAINS), size: int = 16, test_fraction: float = 0.25, seed: int = 0
) -> ImageSplit:
    """Digits in each of ``domains`` (1 channel, ``size x size``), standardised with one global mean
    and std of the training images (so domains keep their different statistics).

    ``meta_train["domain"]`` / ``meta_test["domain"]`` hold the domain index (into ``domains``),
    ``meta_*["example_id"]`` a unique id per image (for hash routing) and ``meta_*["digit_id"]`` the
    index of the source digit (shared by its renderings: hold out by it to keep a digit out of training).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_int("size", size, low=8)
    if not domains:
        raise ValueError("domains must name at least one domain")
    for d in domains:
        if d not in DOMAINS:
            raise ValueError(f"unknown domain {d!r}; available: {list(DOMAINS)}")
    data = load_digits()
    base = upscale_images(torch.tensor(data.images, dtype=torch.float32) / 16.0, size, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)
    idx_tr, idx_te = torch.tensor(idx_tr), torch.tensor(idx_te)
    rendered = [render_domain(base, d, seed=seed + i) for i, d in enumerate(domains)]

    def gather(idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = torch.cat([r[idx] for r in rendered])
        y = labels[idx].repeat(len(domains))
        dom = torch.arange(len(domains)).repeat_interleave(len(idx))
        return x, y, dom, idx.repeat(len(domains))

    x_tr, y_tr, d_tr, s_tr = gather(idx_tr)
    x_te, y_te, d_te, s_te = gather(idx_te)
    mean, std = x_tr.mean(), x_tr.std().clamp_min(1e-3)
    n_tr = x_tr.shape[0]
    return ImageSplit(
        (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, 10, "domain-digits",
        meta_train={"domain": d_tr, "example_id": torch.arange(n_tr), "digit_id": s_tr},
        meta_test={"domain": d_te, "example_id": torch.arange(n_tr, n_tr + x_te.shape[0]), "digit_id": s_te},
        class_names=tuple(str(i) for i in range(10)),
    )  # fmt: skip
