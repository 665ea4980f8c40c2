"""CIFAR-10/100 binary-format loader on small files written by the test, plus the upscaled digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.data.cifar import load_cifar, load_cifar_split, read_cifar_file
from moekit.data.images import load_digit_images


def records(labels: list[tuple[int, ...]], seed: int) -> tuple[bytes, np.ndarray]:
    """Binary records (label bytes then 3072 pixels: R plane, G plane, B plane) and the images [N, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    raw = b"".join(bytes(lab) + img.tobytes() for lab, img in zip(labels, images))
    return raw, images


def write_cifar10(root: Path, n: int = 3) -> dict[str, tuple[list[int], np.ndarray]]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    written = {}
    for i, name in enumerate(files):
        labels = [(i + j) % 10 for j in range(n)]
        raw, images = records([(lab,) for lab in labels], seed=i)
        (folder / name).write_bytes(raw)
        written[name] = (labels, images)
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return written


def test_cifar10_round_trip(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    images, labels, coarse = load_cifar(tmp_path, "cifar10", "train")
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 32, 32) and coarse is None
    want = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    assert np.array_equal(images.numpy(), want)
    assert labels.tolist() == sum((written[f"data_batch_{i}.bin"][0] for i in range(1, 6)), [])
    # channel planes: the first 1024 pixel bytes of a record are the red channel
    raw = (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").read_bytes()
    test_images, _, _ = read_cifar_file(tmp_path / "cifar-10-batches-bin" / "test_batch.bin")
    assert bytes(test_images[0, 0].flatten().tolist()) == raw[1 : 1 + 1024]
    split = load_cifar_split(tmp_path / "cifar-10-batches-bin", "cifar10", num_test=2)
    assert split.x_train.shape == (15, 3, 32, 32) and split.x_test.shape == (2, 3, 32, 32)
    assert split.class_names[3] == "class3" and split.meta_train == {}
    assert abs(float(split.x_train.mean())) < 1e-5


def test_cifar100_coarse_and_fine(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, seed in (("train.bin", 0), ("test.bin", 1)):
        raw, _ = records([(19, 99), (0, 5), (7, 42)], seed)
        (folder / name).write_bytes(raw)
    images, fine, coarse = load_cifar(tmp_path, "cifar100", "test")
    assert fine.tolist() == [99, 5, 42] and coarse.tolist() == [19, 0, 7]
    split = load_cifar_split(tmp_path, "cifar100")
    assert split.num_classes == 100 and split.meta_test["superclass"].tolist() == [19, 0, 7]


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin.*truncated.*3073-byte record"):
        load_cifar(tmp_path, "cifar10", "train")


def test_empty_and_corrupt_labels(tmp_path: Path) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_cifar_file(empty)
    raw, _ = records([(3,), (12,)], 0)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw)
    with pytest.raises(ValueError, match=r"bad\.bin.*corrupt: record 1 has label 12, allowed 0\.\.9"):
        read_cifar_file(bad)
    raw100, _ = records([(25, 1)], 0)
    bad.write_bytes(raw100)
    with pytest.raises(ValueError, match="coarse label 25"):
        read_cifar_file(bad, "cifar100")
    # a CIFAR-100 file read as CIFAR-10 does not divide into 3073-byte records
    with pytest.raises(ValueError, match="not a multiple"):
        read_cifar_file(bad, "cifar10")


def test_missing_files_and_pickle_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="binary version"):
        load_cifar(tmp_path, "cifar10")
    pickle_dir = tmp_path / "cifar-10-batches-py"
    pickle_dir.mkdir()
    (pickle_dir / "data_batch_1").write_bytes(b"\x80\x04not read")
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
        load_cifar(pickle_dir, "cifar10")
    write_cifar10(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-bin" / "data_batch_5.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5.bin"):
        load_cifar(tmp_path / "partial", "cifar10", "train")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_cifar(tmp_path, "cifar1000")


def test_digit_images() -> None:
    data = load_digit_images(size=16, channels=3)
    assert data.x_train.shape[1:] == (3, 16, 16) and data.x_train.shape[0] + data.x_test.shape[0] == 1797
    assert data.num_classes == 10 and set(data.y_test.tolist()) == set(range(10))
    torch.testing.assert_close(data.x_train[:, 0], data.x_train[:, 2])  # grey repeated over channels
    small = data.subset(20, 10)
    assert small.x_train.shape[0] == 20 and small.y_test.shape[0] == 10
    with pytest.raises(ValueError, match="size must be >= 8"):
        load_digit_images(size=4)
