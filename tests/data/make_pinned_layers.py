"""Write ``tests/data/pinned_layers.json``: the fingerprints of every case of ``tests/pinned_layer_cases.py``
as the code computes them now. Run once before a refactor of the layers (``python tests/data/make_pinned_layers.py``);
``tests/test_pinned_layers.py`` then checks that the refactored code computes the same values."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pinned_layer_cases import CASES, fingerprint  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    cases = {name: fingerprint(name) for name in sorted(CASES)}
    out = {"generated_by": "tests/data/make_pinned_layers.py", "torch": torch.__version__,
           "python": platform.python_version(), "cases": cases}
    path = HERE / "pinned_layers.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
