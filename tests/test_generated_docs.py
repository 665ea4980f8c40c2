"""Every generated block of every document in ``docs/`` (and of the README) is what its committed results
JSON renders to (regenerate with ``moekit report --doc docs/<page>.md``), from full runs, with its figures
present."""

import re
from pathlib import Path

import pytest

from moekit.reporting_docs import find_blocks, load_results, stale_blocks

ROOT = Path(__file__).resolve().parents[1]
PAGES = [p for p in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
         if find_blocks(p.read_text(encoding="utf-8"), where=str(p))]  # fmt: skip


def test_some_documents_are_generated() -> None:
    assert {"smear.md", "comet.md", "constraints.md", "demo.md", "mcsmoe.md", "README.md"} <= {p.name for p in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_generated_blocks_match_their_results(page: Path) -> None:
    stale = stale_blocks(page)
    assert not stale, "stale generated blocks (run `moekit report --doc docs/%s`): %s" % (
        page.name, ", ".join(b.label(page.name) for b in stale))  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_sources_are_full_runs_and_figures_exist(page: Path) -> None:
    for block in find_blocks(page.read_text(encoding="utf-8")):
        results = load_results(page.parent / block.source, experiment=block.section != "table")
        assert not results.get("smoke_run"), f"{page.name}:{block.line} publishes a smoke run ({block.source})"
        if "experiment" in results:
            assert results.get("command"), f"{block.source} does not record the command that wrote it"
        if "images" in block.options:
            text = page.read_text(encoding="utf-8")[block.start : block.end]
            for name in re.findall(r"\]\(([^)]+\.png)\)", text):
                assert (page.parent / name).is_file(), f"{page.name}:{block.line} links a missing figure {name}"
