"""Make stock transformers refuse a checkpoint that only moekit can load, with a message saying how.

An exact-form merged checkpoint (G experts, routers with E outputs) would otherwise fail in stock
``from_pretrained`` with a size-mismatch report (fused families) or, for Switch, load *silently wrong*
(missing router keys re-initialised). ``mark_moekit_only(directory)`` records in the saved
``config.json`` an ``experts_implementation`` that names ``moekit.load_hf_model``; transformers checks
that field when it builds any model and raises::

    ValueError: Specified `experts_implementation="moekit-only checkpoint: load it with
    moekit.load_hf_model(path)"` is not supported. ...

``moekit.load_hf_model`` calls ``clear_moekit_only(config)`` on the loaded config before building the
model, so the marker never reaches transformers there. A ``README.md`` in the directory says the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...reporting import atomic_write_text

__all__ = ["MOEKIT_ONLY", "mark_moekit_only", "is_moekit_only", "clear_moekit_only"]

#: the ``experts_implementation`` value that stock transformers rejects, naming moekit's loader
MOEKIT_ONLY = "moekit-only checkpoint: load it with moekit.load_hf_model(path)"
FIELD = "experts_implementation"
README = """\
# moekit-only checkpoint

This directory holds a Mixture-of-Experts model {what}.
Stock `transformers` cannot build it; load it with moekit:

```python
import moekit
model = moekit.load_hf_model("{name}")
```

`config.json` records it in `{field}` and sets `experts_implementation` to a value that
stock `from_pretrained` rejects with this instruction.
"""


EXACT_FORM = "in moekit's exact merged form (fewer experts than router outputs, with an index map)"


def mark_moekit_only(directory: str | os.PathLike[str], *, what: str = EXACT_FORM, field: str = "moekit_merge",
                     name: str | None = None) -> Path:  # fmt: skip
    """Mark the ``save_pretrained`` output in ``directory`` as loadable by ``moekit.load_hf_model`` only:
    sets ``experts_implementation`` in its ``config.json`` and writes a ``README.md`` saying so (both
    atomically; an existing README is left as it is). ``what`` says what moekit-only layout it holds and
    ``field`` which config field records it; ``name`` is the path the README's example loads (default: the
    directory's name; give the final name when marking a staging directory before publishing it)."""
    directory = Path(directory)
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[FIELD] = MOEKIT_ONLY
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = directory / "README.md"
    if not readme.exists():
        atomic_write_text(readme, README.format(name=name or directory.name, what=what, field=field))
    return directory


def is_moekit_only(config: Any) -> bool:
    """Whether a loaded ``PretrainedConfig`` carries the marker."""
    return getattr(config, "_experts_implementation", None) == MOEKIT_ONLY


def clear_moekit_only(config: Any) -> Any:
    """Remove the marker from a loaded config (transformers then picks its default experts implementation)."""
    if is_moekit_only(config):
        config._experts_implementation = None
    return config
