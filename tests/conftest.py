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
