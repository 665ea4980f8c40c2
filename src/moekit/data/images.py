"""Image datasets for CNN MoEs: scikit-learn's 8x8 digits upscaled to ``C x S x S`` (no download), and
the common container ``ImageSplit`` that the CIFAR loader fills too.

Images are standardised per channel with training-set statistics. ``meta_*`` hold per-image
metadata (e.g. CIFAR-100 superclasses, digit domains) for analyses such as mutual information.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int

__all__ = ["ImageSplit", "standardise_images", "upscale_images", "load_digit_images"]


@dataclass(frozen=True)
class ImageSplit:
    """Train/test images ``[N, C, H, W]`` (float, standardised), labels ``[N]`` and metadata ``{key: [N]}``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str
    meta_train: dict[str, Tensor] = field(default_factory=dict)
    meta_test: dict[str, Tensor] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    def subset(self, num_train: int | None = None, num_test: int | None = None, *, seed: int = 0) -> ImageSplit:
        """A random subset (reproducible by ``seed``) of ``num_train`` / ``num_test`` images, in their
        original order (None keeps a whole part), for quick runs."""
        gen = torch.Generator().manual_seed(seed)

        def pick(n: int | None, total: int) -> Tensor:
            if n is None or n >= total:
                return torch.arange(total)
            return torch.randperm(total, generator=gen)[: check_int("num_train/num_test", n, low=1)].sort().values

        tr, te = pick(num_train, len(self.y_train)), pick(num_test, len(self.y_test))
        return ImageSplit(
            self.x_train[tr],
            self.y_train[tr],
            self.x_test[te],
            self.y_test[te],
            self.num_classes,
            self.name,
            {k: v[tr] for k, v in self.meta_train.items()},
            {k: v[te] for k, v in self.meta_test.items()},
            self.class_names,
        )


    def holdout(self, fraction: float, *, seed: int = 0, group: str | None = None) -> ImageSplit:
        """A validation split carved out of the training part: an ``ImageSplit`` whose *train* part is the
        remaining training images and whose *test* part is a random ``fraction`` of them (the validation
        set; this split's test images are not used). With ``group`` (a ``meta_train`` key, e.g.
        ``"digit_id"``), whole groups are held out, so no group is in both parts."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        gen = torch.Generator().manual_seed(seed)
        if group is None:
            ids = torch.arange(len(self.y_train))
        elif group in self.meta_train:
            ids = self.meta_train[group]
        else:
            raise ValueError(f"group {group!r} is not a training metadata key; keys: {sorted(self.meta_train)}")
        groups = torch.unique(ids)
        held = groups[torch.randperm(len(groups), generator=gen)[: max(1, round(fraction * len(groups)))]]
        is_val = torch.isin(ids, held)
        if bool(is_val.all()):
            raise ValueError(f"fraction {fraction} of {len(groups)} groups leaves no training images")
        val, fit = is_val.nonzero().squeeze(1), (~is_val).nonzero().squeeze(1)
        return ImageSplit(
            self.x_train[fit], self.y_train[fit], self.x_train[val], self.y_train[val], self.num_classes, self.name,
            {k: v[fit] for k, v in self.meta_train.items()}, {k: v[val] for k, v in self.meta_train.items()},
            self.class_names,
        )  # fmt: skip


def standardise_images(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel standardisation with the training set's mean and std."""
    x_train, x_test = x_train.float(), x_test.float()
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x_train - mean) / std, (x_test - mean) / std


def upscale_images(images_NHW: Tensor, size: int, channels: int) -> Tensor:
    """Bilinear upscaling of grey images ``[N, h, w]`` to ``[N, channels, size, size]`` (channels repeated)."""
    x = F.interpolate(images_NHW.float().unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous()


def load_digit_images(*, size: int = 32, channels: int = 3, test_fraction: float = 0.25, seed: int = 0) -> ImageSplit:
    """scikit-learn's 1797 handwritten digits, upscaled to ``channels x size x size``, stratified
    train/test split reproducible by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_int("size", size, low=8)
    check_int("channels", channels, low=1)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    idx_tr, idx_te = train_test_split(
        range(len(data.target)), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    images = upscale_images(torch.tensor(data.images, dtype=torch.float32), size, channels)
    labels = torch.tensor(data.target, dtype=torch.long)
    x_tr, x_te = standardise_images(images[idx_tr], images[idx_te])
    return ImageSplit(
        x_tr, labels[idx_tr], x_te, labels[idx_te], 10, f"digits{size}", class_names=tuple(str(d) for d in range(10))
    )
