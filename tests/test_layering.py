"""The layering rule of docs/design.md, read from the import statements of src/moekit (every
``import`` / ``from ... import``, at top level or inside a function; not the entry point of a script,
``if __name__ == "__main__":``, which belongs to the command line):

* every subpackage and top-level module stands on one line of the layout in docs/design.md, and
  imports only from its own line or the lines above it;
* the core (``routers/``, ``experts/``, ``layers/``) imports none of ``merging/``, ``analysis/``,
  ``experiments/``, ``cli/``;
* nothing but ``cli/`` imports ``experiments/``; nothing outside ``cli/`` imports ``cli/``;
* there is no import cycle between subpackages, apart from the arrows listed in ``KNOWN_CYCLE_EDGES``
  (each with the reason it is still there); that list may only shrink;
* there is one training loop: no module but ``training.py`` calls ``.backward()`` (the others drive
  ``training.training_steps``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moekit"
CORE = ("routers", "experts", "layers")
UPPER = ("merging", "analysis", "experiments", "cli")

#: arrows that still close a cycle between subpackages: (importer, imported) -> why it is still there
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _unit(module: str) -> str | None:
    """``moekit.layers.moe`` -> ``layers``; ``moekit.types`` -> ``types``; outside moekit -> None."""
    parts = module.split(".")
    if parts[0] != "moekit" or len(parts) < 2:
        return None
    return parts[1]


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` -- a script's entry point, not an import of the library."""
    t = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(t, ast.Compare) and isinstance(t.left, ast.Name)
            and t.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                for c in t.comparators))


def _walk(node: ast.AST):
    """``ast.walk`` without the bodies of main guards."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not _is_main_guard(child):
            yield from _walk(child)


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts) if path.name == "__init__.py" else list(rel.parts[:-1])
    if path.name == "__init__.py":
        package = package[:-1] + [package[-1]]
    out = []
    for node in _walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "moekit":  # "from moekit import x": x is a submodule or an attribute of __init__
                out += [f"moekit.{a.name}" for a in node.names
                        if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").exists()]
            else:
                out.append(target)
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if src is None or path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        for target in _imports(path):
            dst = _unit(target)
            if dst is not None and dst != src and dst != "__init__":
                edges[(src, dst)].append(f"{path.relative_to(PACKAGE)} imports {target}")
    return edges


def _cycle_edges(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Edges whose two ends lie in one strongly connected component (i.e. on some cycle)."""
    nodes = {n for e in edges for n in e}
    reach = {n: {b for a, b in edges if a == n} for n in nodes}
    changed = True
    while changed:  # transitive closure (a few dozen nodes)
        changed = False
        for n in nodes:
            new = set().union(*(reach[m] for m in reach[n])) | reach[n]
            if new != reach[n]:
                reach[n], changed = new, True
    return {(a, b) for a, b in edges if a in reach[b]}


def test_the_scan_sees_the_known_arrows() -> None:
    edges = _edges()
    assert ("layers", "experts") in edges and ("layers", "routers") in edges and ("cli", "experiments") in edges


def _design_layout() -> list[set[str]]:
    """The lines of the layout block in docs/design.md (under "Layout and the layering rule"), top first,
    each as the set of units it names (``routers/`` -> ``routers``, ``stats.py`` -> ``stats``)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = text.split("### Layout and the layering rule", 1)[1].split("```", 2)[1]
    lines = [line.split() for line in block.strip().splitlines()[1:]]  # the first line is "src/moekit/"
    return [{w.removesuffix("/").removesuffix(".py") for w in words if w.endswith(("/", ".py"))} for words in lines]


def test_every_unit_stands_on_one_line_of_the_design_layout() -> None:
    layout = _design_layout()
    named = [u for line in layout for u in line]
    assert len(named) == len(set(named)), f"a unit is on two lines of the layout: {named}"
    units = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    units |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert units == set(named), f"not in the layout: {sorted(units - set(named))}; gone: {sorted(set(named) - units)}"


def test_imports_point_only_to_the_same_line_or_above() -> None:
    line_of = {u: i for i, line in enumerate(_design_layout()) for u in line}
    bad = [w for (a, b), where in _edges().items() if line_of[b] > line_of[a] for w in where]
    assert not bad, "imports of a unit that stands lower in the layout of docs/design.md:\n" + "\n".join(bad)


def test_core_does_not_import_upper_layers() -> None:
    bad = [w for (a, b), where in _edges().items() if a in CORE and b in UPPER for w in where]
    assert not bad, "the core (routers/, experts/, layers/) imports an upper layer:\n" + "\n".join(bad)


def test_only_cli_imports_experiments_and_cli() -> None:
    bad = [w for (a, b), where in _edges().items()
           if (b == "experiments" and a != "cli") or (b == "cli" and a != "cli") for w in where]
    assert not bad, "imports of experiments/ or cli/ from outside cli/:\n" + "\n".join(bad)


def test_no_import_cycle_between_subpackages() -> None:
    edges = _edges()
    on_cycle = _cycle_edges(set(edges))
    new = sorted(on_cycle - set(KNOWN_CYCLE_EDGES))
    assert not new, "import cycles between subpackages:\n" + "\n".join(
        f"{a} -> {b}: {'; '.join(edges[(a, b)][:3])}" for a, b in new)
    gone = sorted(set(KNOWN_CYCLE_EDGES) - on_cycle)
    assert not gone, f"no longer on a cycle, remove from KNOWN_CYCLE_EDGES: {gone}"


def _backward_calls(path: Path) -> list[int]:
    """Lines of ``path`` that call ``<something>.backward(...)`` (not ``def backward`` of an autograd Function)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"]


def test_one_training_loop() -> None:
    found = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py")) if (lines := _backward_calls(p))}
    assert "training.py" in found, "the scan no longer sees the loop of training.training_steps"
    others = {p: lines for p, lines in found.items() if p != "training.py"}
    assert not others, f"training loops outside training.training_steps (calls of .backward()): {others}"


def test_cycle_detection_finds_a_cycle() -> None:
    assert _cycle_edges({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == {("a", "b"), ("b", "c"), ("c", "a")}
