"""Generated blocks in markdown documents: every number of a published document comes from a results
JSON committed beside it, through one renderer, and a test regenerates them all.

A block in a markdown file::

    <!-- moekit:generated source=results/smear.json section=table -->
    ...text written by the renderer; never edit by hand...
    <!-- /moekit:generated -->

``source`` is the results JSON, relative to the document; ``section`` names one renderer of the
experiment that wrote the JSON (its ``"experiment"`` key); any other ``key=value`` is passed to the
renderer (e.g. ``images=img/smear``: figures are written there and linked from the block).

``section=table`` works on any JSON (a benchmark's, say): ``rows=`` is the dotted path to a list of
objects (or to an object of objects: its keys become a ``key`` column) and ``columns=`` the
comma-separated dotted paths to show (``format=`` for numbers, default ``.4g``)::

    <!-- moekit:generated source=../benchmarks/results/bench_comet.json section=table rows=rows columns=gate,speedup -->

A renderer module (one per experiment, see ``RENDERERS``) defines

* ``SECTIONS: dict[str, Callable[[dict, ...], str]]``: ``section(results, **options) -> markdown``;
* ``write_figures(results, directory) -> None``: writes the PNGs its sections link to;
* ``write_report(results, directory) -> None``: a run's own ``report.md`` and figures, made of the
  same sections (``moekit report RESULTS.json`` calls it).

``update_document(doc)`` rewrites a document's blocks (and figures); ``stale_blocks(doc)`` lists
the blocks whose text differs from what their JSON gives (the test, and ``moekit report --check``).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

from .reporting import atomic_write_text

__all__ = [
    "RENDERERS",
    "Block",
    "find_blocks",
    "load_results",
    "json_table",
    "renderer",
    "render_section",
    "regenerate",
    "update_document",
    "stale_blocks",
]

#: experiment name (the ``"experiment"`` key of its results JSON) -> module defining SECTIONS
RENDERERS: dict[str, str] = {
    "demo": "moekit.experiments.demo_report",
    "smear": "moekit.experiments.smear_report",
    "comet": "moekit.experiments.comet_report",
    "constraints": "moekit.experiments.constraints_report",
    "mcsmoe": "moekit.experiments.mcsmoe_report",
    "compression": "moekit.experiments.compression_report",
}

_OPEN = re.compile(r"<!-- moekit:generated(?P<attrs>(?:\s+[\w.-]+=\S+?)*)\s*-->\n")
_CLOSE = "<!-- /moekit:generated -->"
_ATTR = re.compile(r"([\w.-]+)=(\S+)")


@dataclass(frozen=True)
class Block:
    """One generated block: its attributes and the span ``[start, end)`` of its body in the text."""

    source: str
    section: str
    options: dict[str, str] = field(default_factory=dict)
    start: int = 0
    end: int = 0
    line: int = 0

    def label(self, doc: str | Path = "") -> str:
        return f"{doc}:{self.line} (source={self.source} section={self.section})"


def find_blocks(text: str, *, where: str = "document") -> list[Block]:
    """Every generated block of a markdown text, in order; malformed blocks are a ValueError."""
    blocks = []
    pos = 0
    while (m := _OPEN.search(text, pos)) is not None:
        attrs = dict(_ATTR.findall(m.group("attrs")))
        line = text.count("\n", 0, m.start()) + 1
        end = text.find(_CLOSE, m.end())
        if end < 0:
            raise ValueError(f"{where}:{line}: generated block is not closed by {_CLOSE!r}")
        nested = _OPEN.search(text, m.end(), end)
        if nested is not None:
            raise ValueError(f"{where}:{line}: generated block contains another block opening (nesting is not allowed)")
        missing = [k for k in ("source", "section") if k not in attrs]
        if missing:
            raise ValueError(f"{where}:{line}: generated block needs {' and '.join(missing)}= (has {sorted(attrs)})")
        source, section = attrs.pop("source"), attrs.pop("section")
        blocks.append(Block(source, section, attrs, m.end(), end, line))
        pos = end + len(_CLOSE)
    return blocks


def load_results(path: str | Path, *, experiment: bool = True) -> dict[str, Any]:
    """A JSON object from ``path``; with ``experiment``, one written by an experiment (it names its
    ``"experiment"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(results, dict) or (experiment and "experiment" not in results):
        raise ValueError(f"{str(path)!r} is not a moekit results file (no 'experiment' key)")
    return results


def _at(value: Any, path: str, what: str) -> Any:
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise ValueError(f"{what}={path!r}: no key {key!r} in the JSON (have {have})")
        value = value[key]
    return value


def json_table(data: Mapping[str, Any], *, rows: str, columns: str, format: str = ".4g") -> str:
    """A markdown table of the objects at dotted path ``rows`` of ``data`` (a list of objects, or an object
    of objects whose keys become a ``key`` column), one column per dotted path of ``columns``."""
    from .reporting import markdown_table

    value = _at(data, rows, "rows")
    if isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()):
        value = [{"key": k, **v} for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(r, Mapping) for r in value):
        raise ValueError(f"rows={rows!r} is neither a list of objects nor an object of objects")
    keys = columns.split(",")
    return markdown_table(keys, [[_at(r, k, "columns") for k in keys] for r in value], floatfmt=format)


def renderer(results: Mapping[str, Any]) -> ModuleType:
    """The module that renders this experiment's results."""
    name = results.get("experiment")
    if name not in RENDERERS:
        raise ValueError(f"no renderer for experiment {name!r}; known: {sorted(RENDERERS)}")
    return importlib.import_module(RENDERERS[name])


def render_section(results: Mapping[str, Any], section: str, **options: str) -> str:
    """The markdown of one section, ending with a newline."""
    if section == "table":
        return json_table(results, **options)
    sections: Mapping[str, Callable[..., str]] = renderer(results).SECTIONS
    if section not in sections:
        known = sorted(sections)
        raise ValueError(f"experiment {results['experiment']!r} has no section {section!r}; sections: {known}")
    text = sections[section](results, **options)
    return text if text.endswith("\n") else text + "\n"


def _resolve(doc: Path, block: Block) -> Path:
    return (doc.parent / block.source).resolve()


def regenerate(
    doc: str | Path, *, only_source: str | Path | None = None, text: str | None = None
) -> tuple[str, list[Block]]:
    """The document's text with every block (or those whose source is ``only_source``) re-rendered,
    and the blocks that changed."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8") if text is None else text
    wanted = Path(only_source).resolve() if only_source is not None else None
    cache: dict[Path, dict[str, Any]] = {}
    pieces, changed, pos = [], [], 0
    for block in find_blocks(text, where=str(doc)):
        source = _resolve(doc, block)
        pieces.append(text[pos : block.start])
        body = text[block.start : block.end]
        if wanted is None or source == wanted:
            if source not in cache:
                cache[source] = load_results(source, experiment=block.section != "table")
            new = render_section(cache[source], block.section, **block.options)
            if new != body:
                changed.append(block)
            body = new
        pieces.append(body)
        pos = block.end
    pieces.append(text[pos:])
    return "".join(pieces), changed


def _figure_targets(doc: Path, blocks: Iterable[Block], wanted: Path | None) -> dict[tuple[Path, Path], None]:
    targets: dict[tuple[Path, Path], None] = {}
    for block in blocks:
        source = _resolve(doc, block)
        if "images" in block.options and (wanted is None or source == wanted):
            targets[(source, (doc.parent / block.options["images"]).resolve())] = None
    return targets


def update_document(doc: str | Path, *, only_source: str | Path | None = None, figures: bool = True) -> list[Block]:
    """Rewrite the document's generated blocks from their JSON (atomically) and, when ``figures``,
    the PNGs of blocks with ``images=``. Returns the blocks whose text changed."""
    doc = Path(doc)
    text, changed = regenerate(doc, only_source=only_source)
    if changed:
        atomic_write_text(doc, text)
    if figures:
        wanted = Path(only_source).resolve() if only_source is not None else None
        for source, directory in _figure_targets(doc, find_blocks(text, where=str(doc)), wanted):
            results = load_results(source)
            write = getattr(renderer(results), "write_figures", None)
            if write is None:
                raise ValueError(f"experiment {results['experiment']!r} has no figures, but {doc} asks for images=")
            directory.mkdir(parents=True, exist_ok=True)
            write(results, directory)
    return changed


def stale_blocks(doc: str | Path, *, only_source: str | Path | None = None) -> list[Block]:
    """Blocks whose committed text is not what their JSON renders to (empty: the document is current)."""
    return regenerate(doc, only_source=only_source)[1]
