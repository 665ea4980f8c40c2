"""``experiments.report_common``: an experiment's ``SECTIONS`` get the shared entries, and ``report.md`` is
made of those sections in the given order and headings, after its figures are written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from moekit.confidence import mean_interval
from moekit.experiments.report_common import Claim, report_sections, write_markdown_report

RESULTS: dict[str, Any] = {
    "experiment": "toy", "paper": "https://example.org/paper", "smoke_run": False, "command": "moekit toy",
    "environment": {"torch_threads": 1, "platform": "linux", "versions": {"torch": "2"}}, "timing": {"total_s": 60.0},
    "config": {"name": "toy"},
}  # fmt: skip


def _claims(results: Mapping[str, Any]) -> list[Claim]:
    return [Claim("A beats B", mean_interval([1.0, 1.1, 1.2]))]


def _figures(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("a.png", f"Figure of {results['config']['name']}")]


def test_sections_get_command_runtime_verdicts_and_figures() -> None:
    sections = report_sections(setup=lambda r, **_: "setup text\n", claims=_claims, figures=_figures)
    assert list(sections) == ["command", "runtime", "setup", "verdicts", "figures"]
    assert sections["command"](RESULTS).startswith("```bash\nmoekit toy\n```")
    assert sections["runtime"](RESULTS) == "- `moekit toy`: 1.0 min wall-clock, 1 torch thread(s) on linux.\n"
    assert sections["verdicts"](RESULTS).startswith("- A beats B: **supported**")
    assert sections["verdicts"]({**RESULTS, "smoke_run": True}) == "Smoke run: no verdicts.\n"
    assert sections["figures"](RESULTS) == "![Figure of toy](a.png)\n"
    assert sections["figures"](RESULTS, images="img/toy/") == "![Figure of toy](img/toy/a.png)\n"


def test_sections_without_claims_have_no_verdicts_and_own_sections_win() -> None:
    own = lambda r, **_: "own verdicts\n"  # noqa: E731
    assert "verdicts" not in report_sections(figures=_figures)
    assert report_sections(figures=_figures, claims=_claims, verdicts=own)["verdicts"] is own


def test_report_follows_order_and_headings_and_writes_the_figures_first(tmp_path: Path) -> None:
    written: list[Path] = []

    def write_figures(results: Mapping[str, Any], directory: Path) -> None:
        written.append(directory)
        (directory / "a.png").write_bytes(b"png")

    sections = report_sections(setup=lambda r, **_: "setup text\n", results=lambda r, **_: "numbers\n",
                               figures=_figures)  # fmt: skip
    path = write_markdown_report(RESULTS, str(tmp_path), sections, write_figures, title="Toy",
                                 figures=_figures(RESULTS), order=("results", "setup"),
                                 headings={"setup": "How"}, footer="the end\n")  # fmt: skip
    assert written == [tmp_path] and path == tmp_path / "report.md"
    assert path.read_text() == (
        "# Toy\n\nPaper: https://example.org/paper.\n\n## Results\n\nnumbers\n\n## How\n\nsetup text\n\n"
        "## Figure of toy\n\n![Figure of toy](a.png)\n\nthe end\n"
    )
