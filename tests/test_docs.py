"""Every Python example in ``docs/*.md`` runs as written.

The blocks of one page run in order in one namespace (later examples build on earlier ones), in a
temporary working directory. A block right after ``<!-- docs-test: skip (reason) -->`` is not run;
the reason says why (for example: it needs torchrun).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"(<!-- docs-test: skip[^>]*-->\s*\n)?^([ \t]*)```python\n(.*?)^\2```", re.S | re.M)
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(text: str) -> list[tuple[bool, str]]:
    """``[(skipped, code)]`` for every fenced python block of a markdown page, indentation removed."""
    return [(bool(skip), textwrap.dedent(code)) for skip, _, code in BLOCK.findall(text)]


def test_block_parser_sees_indented_and_skipped_blocks() -> None:
    page = "a\n```python\nx = 1\n```\n<!-- docs-test: skip (why) -->\n```python\nboom\n```\n  ```python\n  y = 2\n  ```\n"
    assert python_blocks(page) == [(False, "x = 1\n"), (True, "boom\n"), (False, "y = 2\n")]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, tmp_path, monkeypatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not any(not skipped for skipped, _ in blocks):
        pytest.skip(f"{page.name} has no runnable python example")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, (skipped, code) in enumerate(blocks):
        if not skipped:
            exec(compile(code, f"{page.name} (python block {i})", "exec"), namespace)
