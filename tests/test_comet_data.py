"""Embedded multi-task data (Ma et al. synthetic, MultiDigits) and the MNIST IDX reader."""

import gzip
import struct

import numpy as np
import pytest
import torch

from moekit.data.idx import load_mnist, read_idx
from moekit.data.multidigits import make_multidigits, overlay_pairs, overlay_split
from moekit.data.synthetic_multitask import make_synthetic_multitask


def test_synthetic_correlation_controls_task_similarity() -> None:
    corr = []
    for p in (1.0, 0.5, 0.0):
        data = make_synthetic_multitask(3000, dim=30, correlation=p, noise_std=0.0, seed=3)
        corr.append(float(torch.corrcoef(torch.stack(data.ys_train))[0, 1]))
    assert corr[0] == pytest.approx(1.0, abs=1e-5)  # identical weight vectors, no noise
    assert corr[0] > corr[1] > corr[2]


def test_synthetic_shapes_standardisation_and_seed() -> None:
    a = make_synthetic_multitask(1000, dim=12, num_tasks=3, seed=1)
    b = make_synthetic_multitask(1000, dim=12, num_tasks=3, seed=1)
    assert a.x_train.shape == (700, 12) and a.x_val.shape == (150, 12) and len(a.ys_test) == 3
    assert all(t.kind == "regression" for t in a.tasks)
    torch.testing.assert_close(a.ys_train[0].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.ys_val[2], b.ys_val[2])
    with pytest.raises(ValueError, match="correlation must be a number in \\[-1, 1\\], got 1.5"):
        make_synthetic_multitask(100, correlation=1.5)


def test_overlay_places_digits_top_left_and_bottom_right() -> None:
    images = torch.zeros(3, 4, 4)
    images[0, 0, 0] = 1.0  # a marker in each image's top-left pixel
    images[1, 0, 0] = 2.0
    images[2, 0, 0] = 3.0
    canvas, ya, yb = overlay_pairs(
        images, torch.tensor([0, 1, 2]), 50, shift=1, generator=torch.Generator().manual_seed(0)
    )
    assert canvas.shape == (50, 6, 6)
    assert (ya != yb).all()
    assert torch.equal(canvas[:, 0, 0], ya.float() + 1) and torch.equal(canvas[:, 2, 2], yb.float() + 1)


def test_multidigits_split() -> None:
    data = make_multidigits(200, 50, 40, seed=0)
    assert data.x_train.shape == (200, 144) and data.x_test.shape == (40, 144)
    assert [t.name for t in data.tasks] == ["top_left", "bottom_right"]
    for ys in (data.ys_train, data.ys_test):
        assert all(int(y.min()) >= 0 and int(y.max()) <= 9 for y in ys)
    torch.testing.assert_close(data.x_train.mean(0), torch.zeros(144), atol=1e-4, rtol=0)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_mnist(directory, n: int = 6, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for stem, data in (
        ("train-images-idx3-ubyte", _idx_bytes(images, 0x08)),
        ("train-labels-idx1-ubyte", _idx_bytes(labels, 0x08)),
    ):
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_written_idx_files(tmp_path, gz: bool) -> None:
    images, labels = _write_mnist(tmp_path, gz=gz)
    x, y = load_mnist(tmp_path, "train")
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.long and y.tolist() == labels.tolist()
    split = overlay_split(x, y, num_train=8, num_val=4, num_test=4, shift=4, val_fraction=0.34, test_fraction=0.34)
    assert split.x_train.shape == (8, 36 * 36)


@pytest.mark.parametrize(
    "code,dtype", [(0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64), (0x09, np.int8)]
)
def test_read_idx_every_type(tmp_path, code: int, dtype) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array, code))
    assert np.array_equal(read_idx(tmp_path / "a.idx").numpy(), array)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b[:3], "truncated: 3 bytes"),
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX type code 0x07"),
        (lambda b: b[:8], "truncated inside its header"),
        (lambda b: b[:-5], "is truncated: shape \\(2, 3\\) of uint8 needs 6 data bytes, found 1"),
        (lambda b: b + b"\x00", "longer than its header says"),
        (lambda b: b[:3] + b"\x00", "declares 0 dimensions"),
    ],
)
def test_corrupt_idx_files_raise_clear_errors(tmp_path, mutate, match) -> None:
    good = _idx_bytes(np.zeros((2, 3), dtype=np.uint8), 0x08)
    path = tmp_path / "bad-idx"
    path.write_bytes(mutate(good))
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_missing_and_mismatched_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte file"):
        load_mnist(tmp_path, "train")
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5, dtype=np.uint8), 0x08))
    with pytest.raises(ValueError, match="has 6 images but train-labels-idx1-ubyte has 5 labels"):
        load_mnist(tmp_path, "train")
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a valid gzip file"):
        read_idx(tmp_path / "x.gz")
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(tmp_path, "validation")
