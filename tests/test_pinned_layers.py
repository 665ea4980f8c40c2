"""Every layer computes today what it computed when ``tests/data/pinned_layers.json`` was written
(outputs, decisions, aux terms, input and parameter gradients, BatchNorm buffers, eval outputs), so a
refactor of the forward is checked, not trusted. Parameter names are part of the fingerprint: a
refactor that renames a parameter (and so breaks saved checkpoints) fails here too.

Regenerate only on purpose, when a change of the numbers is intended: ``python tests/data/make_pinned_layers.py``."""

import json
import math
from pathlib import Path

import pytest
import torch

from pinned_layer_cases import CASES, fingerprint

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_layers.json").read_text())["cases"]


def test_every_case_is_pinned() -> None:
    assert sorted(CASES) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_matches_pinned_values(name: str) -> None:
    torch.set_num_threads(1)
    got, want = fingerprint(name), PINNED[name]
    assert sorted(got) == sorted(want), f"{name}: fingerprint keys changed"
    for key, values in want.items():
        scale = max(1.0, max(abs(v) for v in values))
        for a, b in zip(got[key], values):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6 * scale), f"{name}.{key}: {got[key]} != {values}"
