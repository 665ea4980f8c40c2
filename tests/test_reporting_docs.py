"""Generated blocks in markdown (``moekit.reporting_docs``) and ``moekit report``: parsing, rewriting,
staleness checks and figures, on the results of a real (tiny) demo run."""

import json
from pathlib import Path

import pytest

from moekit.cli.main import main
from moekit.experiments.demo import DemoConfig, run_demo
from moekit.reporting import write_json
from moekit.reporting_docs import find_blocks, render_section, stale_blocks, update_document

OPEN = "<!-- moekit:generated source=results/demo.json section={} -->"
CLOSE = "<!-- /moekit:generated -->"


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(json.dumps(run_demo(DemoConfig(routers=("softmax", "hash"), seeds=(0, 1), epochs=1))))


@pytest.fixture
def doc(tmp_path: Path, results: dict) -> Path:
    write_json(tmp_path / "results" / "demo.json", results)
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nProse stays.\n\n{OPEN.format('results')}\nold table\n{CLOSE}\n\nMore prose.\n\n"
                    f"<!-- moekit:generated source=results/demo.json section=figures images=img/demo -->\n{CLOSE}\n")
    return page


def test_blocks_are_found_with_their_options() -> None:
    text = f"a\n{OPEN.format('setup')}\nbody\n{CLOSE}\nb\n<!-- moekit:generated source=x.json section=s k=v -->\n{CLOSE}\n"
    blocks = find_blocks(text)
    assert [(b.source, b.section, b.options, b.line) for b in blocks] == [
        ("results/demo.json", "setup", {}, 2), ("x.json", "s", {"k": "v"}, 6)]  # fmt: skip
    assert text[blocks[0].start : blocks[0].end] == "body\n"


@pytest.mark.parametrize("text, match", [
    (f"{OPEN.format('setup')}\nnever closed\n", "is not closed"),
    ("<!-- moekit:generated source=a.json -->\nx\n<!-- /moekit:generated -->", "needs section="),
    (f"{OPEN.format('a')}\n{OPEN.format('b')}\n{CLOSE}\n{CLOSE}", "nesting is not allowed"),
])  # fmt: skip
def test_malformed_blocks_are_errors_naming_the_line(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        find_blocks(text, where="page.md")


def test_update_rewrites_only_the_blocks_and_writes_figures(doc: Path, results: dict) -> None:
    assert len(stale_blocks(doc)) == 2
    changed = update_document(doc)
    assert [b.section for b in changed] == ["results", "figures"]
    text = doc.read_text()
    assert text.startswith("# Title\n\nProse stays.\n\n") and "\nMore prose.\n" in text and "old table" not in text
    assert render_section(results, "results") in text and "![expert utilisation](img/demo/utilisation.png)" in text
    assert (doc.parent / "img" / "demo" / "utilisation.png").is_file()
    assert stale_blocks(doc) == [] and update_document(doc, figures=False) == []


def test_a_hand_edited_number_is_stale(doc: Path) -> None:
    update_document(doc, figures=False)
    doc.write_text(doc.read_text().replace("| softmax (dense) |", "| softmax (dense, edited) |"))
    assert [b.section for b in stale_blocks(doc)] == ["results"]


def test_unknown_section_or_experiment_is_an_error(tmp_path: Path, results: dict) -> None:
    with pytest.raises(ValueError, match="has no section 'nope'"):
        render_section(results, "nope")
    with pytest.raises(ValueError, match="no renderer for experiment 'other'"):
        render_section({**results, "experiment": "other"}, "results")


def test_report_command_checks_rewrites_and_rebuilds(doc: Path, tmp_path: Path, capsys) -> None:
    source = doc.parent / "results" / "demo.json"
    assert main(["report", "--doc", str(doc), "--check"]) == 1
    assert "stale:" in capsys.readouterr().err
    assert main(["report", str(source), "--doc", str(doc), "--quiet"]) == 0
    assert main(["report", "--doc", str(doc), "--check"]) == 0
    out = tmp_path / "rebuilt"
    assert main(["report", str(source), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# moekit demo") and (out / "utilisation.png").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(source.read_text())


def test_report_command_user_errors(tmp_path: Path, capsys) -> None:
    assert main(["report"]) == 2
    assert "give a RESULTS.json, a --doc DOC.md, or both" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["report", str(tmp_path / "x.json")]) == 2
    assert "not a moekit results file" in capsys.readouterr().err


def test_table_section_renders_any_json(tmp_path: Path) -> None:
    bench = {"rows": [{"gate": "comet", "speed": {"x": 10.078}}, {"gate": "dselect", "speed": {"x": 10.5}}],
             "cases": {"a": {"ms": 1.5}, "b": {"ms": 2.25}}}  # fmt: skip
    write_json(tmp_path / "bench.json", bench)
    page = tmp_path / "bench.md"
    page.write_text("<!-- moekit:generated source=bench.json section=table rows=rows columns=gate,speed.x format=.3g -->\n"
                    f"{CLOSE}\n<!-- moekit:generated source=bench.json section=table rows=cases columns=key,ms -->\n"
                    f"{CLOSE}\n")  # fmt: skip
    update_document(page)
    text = page.read_text()
    assert "| gate | speed.x |\n|---|---|\n| comet | 10.1 |\n| dselect | 10.5 |\n" in text
    assert "| key | ms |\n|---|---|\n| a | 1.5 |\n| b | 2.25 |\n" in text
    page.write_text(f"<!-- moekit:generated source=bench.json section=table rows=rows columns=gate,nope -->\n{CLOSE}\n")
    with pytest.raises(ValueError, match="columns='nope': no key 'nope'"):
        update_document(page)
