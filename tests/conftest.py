import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# The suite runs as `pytest -n 2`: one intra-op thread per worker keeps the two workers off each
# other's cores (tiny matmuls with 2 OpenMP threads per process were ~1000x slower here).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _measured_cpu(monkeypatch) -> None:
    """The native kernel's routing (``native_gemv.MAX_ROWS``) is measured per CPU (vendor, AMX) and
    leaves unmeasured CPUs on torch's kernels; tests that check which kernel runs use this CPU's table, or the
    Intel one where this CPU has none, so what they check does not depend on the machine CI runs on."""
    from moekit.experts import native_gemv

    if native_gemv.cpu_profile() not in native_gemv.MAX_ROWS:
        monkeypatch.setattr(native_gemv, "cpu_profile", lambda: "GenuineIntel+AMX")


def _assert_pngs_readable(directory, *, expected=()) -> list:
    """Open every PNG under ``directory`` (``expected`` names must be among them); each must be a real,
    non-blank image of a readable size. Returns the paths checked."""
    from pathlib import Path

    import matplotlib.image
    import numpy as np

    paths = sorted(Path(directory).rglob("*.png"))
    names = {p.name for p in paths}
    assert set(expected) <= names, f"missing PNGs: {set(expected) - names}"
    for path in paths:
        image = matplotlib.image.imread(path)
        height, width = image.shape[:2]
        assert 300 <= width <= 4000 and 250 <= height <= 4000, f"{path.name}: {width}x{height} px"
        assert width / height < 6, f"{path.name} is a strip ({width}x{height} px): use a grid"
        rgb = image[..., :3].astype(np.float64)
        inked = (rgb.max(axis=-1) - rgb.min(axis=-1) > 0.1) | (rgb.mean(axis=-1) < 0.85)
        assert inked.mean() > 0.02, f"{path.name} is nearly blank ({inked.mean():.1%} of pixels drawn)"
    return paths


@pytest.fixture
def assert_pngs_readable():
    """``assert_pngs_readable(directory, expected=(...))``: every PNG a run wrote opens and is not blank."""
    return _assert_pngs_readable
