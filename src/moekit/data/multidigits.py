"""MultiDigits: two scikit-learn digits overlaid on one canvas, one shifted up-left and one
down-right, with one classification task per digit -- a small, download-free analogue of
MultiMNIST (Sabour et al. 2017; the COMET/DSelect-k variant: 28x28 digits shifted 4 px on 36x36).

``overlay_split`` builds the same data from any ``[N, H, W]`` images (e.g. MNIST read with
``moekit.data.idx.load_mnist``). Images are split into disjoint train/val/test pools *before*
pairing, so test pairs use unseen digit images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int
from ..models.multitask import TaskSpec
from .synthetic_multitask import MultiTaskSplit, split_sizes

__all__ = ["overlay_pairs", "overlay_split", "make_multidigits"]


def overlay_pairs(
    images_NHW: Tensor, labels_N: Tensor, num_pairs: int, *, shift: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``num_pairs`` canvases ``[P, H+2s, W+2s]``: image a at the top-left, a different image b at
    ``(2s, 2s)``, combined by pixelwise max. Returns canvases and the labels of a and of b."""
    N, H, W = images_NHW.shape
    if N < 2:
        raise ValueError(f"overlay needs at least 2 images, got {N}")
    a = torch.randint(N, (num_pairs,), generator=generator)
    b = (a + torch.randint(1, N, (num_pairs,), generator=generator)) % N  # b != a
    img = images_NHW.float()
    canvas = img.new_zeros(num_pairs, H + 2 * shift, W + 2 * shift)
    canvas[:, :H, :W] = img[a]
    canvas[:, 2 * shift :, 2 * shift :] = torch.maximum(canvas[:, 2 * shift :, 2 * shift :], img[b])
    return canvas, labels_N[a].long(), labels_N[b].long()


def overlay_split(
    images_NHW: Tensor,
    labels_N: Tensor,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    shift: int,
    num_classes: int = 10,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> MultiTaskSplit:
    """Split the images into disjoint pools, overlay pairs within each pool, flatten and
    standardise features with training statistics. Tasks: ``"top_left"`` and ``"bottom_right"``."""
    if images_NHW.dim() != 3 or labels_N.shape != images_NHW.shape[:1]:
        raise ValueError(
            f"need images [N, H, W] and labels [N], got {tuple(images_NHW.shape)} and {tuple(labels_N.shape)}"
        )
    for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        check_int(name, v, low=1)
    check_int("shift", shift, low=0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(images_NHW.shape[0], generator=gen)
    n_tr, n_va, _ = split_sizes(images_NHW.shape[0], val_fraction, test_fraction)
    pools = [order[:n_tr], order[n_tr : n_tr + n_va], order[n_tr + n_va :]]
    parts = []
    for pool, count in zip(pools, (num_train, num_val, num_test)):
        canvas, ya, yb = overlay_pairs(images_NHW[pool], labels_N[pool], count, shift=shift, generator=gen)
        parts.append((canvas.flatten(1), [ya, yb]))
    mean, std = parts[0][0].mean(0), parts[0][0].std(0).clamp_min(1e-3)
    xs = [(x - mean) / std for x, _ in parts]
    tasks = [
        TaskSpec("top_left", "classification", num_classes),
        TaskSpec("bottom_right", "classification", num_classes),
    ]
    return MultiTaskSplit(xs[0], parts[0][1], xs[1], parts[1][1], xs[2], parts[2][1], tasks)


def make_multidigits(
    num_train: int = 6000, num_val: int = 1500, num_test: int = 1500, *, shift: int = 2, seed: int = 0
) -> MultiTaskSplit:
    """MultiDigits from scikit-learn's 1797 8x8 digits (no download): 12x12 canvases for ``shift=2``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    return overlay_split(
        images, labels, num_train=num_train, num_val=num_val, num_test=num_test, shift=shift, seed=seed
    )
