"""Every PNG a ``--quick`` run writes reads without the code beside it.

Each command runs once (restricted to a few configurations, still ``--quick``); every figure it saves is
checked when saved (``Figure.savefig`` is wrapped): the title says "smoke run", every colour-mapped
image has a labelled colour bar, every axes that draws several colours has a legend, every dashed or
dotted reference line is named in a legend, no panel's labels run into another panel, and each panel
is at least readable size. The files themselves are then opened: size and not blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moekit.cli.main import main

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.collections import Collection, QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage, imread  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

QUICK_RUNS = {
    "demo": ["demo", "--routers", "topk,hash"],
    "smear": ["reproduce", "smear", "--methods", "smear,tag,hash"],
    "comet": ["reproduce", "comet", "--datasets", "synthetic"],
    "constraints": ["reproduce", "constraints"],
    "mcsmoe": ["reproduce", "mcsmoe"],
}
MIN_PANEL_PX = 150  # the narrowest readable panel side at the saved dpi


def _is_colorbar(ax: Any) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _colours(ax: Any) -> set[tuple[float, ...]]:
    """The distinct colours an axes draws data in (lines, markers, bars; not images)."""
    found: set[tuple[float, ...]] = set()
    for line in ax.lines:
        if len(line.get_xdata()) > 2 or line.get_marker() not in ("None", None, ""):
            found.add(tuple(round(c, 3) for c in matplotlib.colors.to_rgba(line.get_color())))
    for coll in ax.collections:
        if isinstance(coll, QuadMesh) or not isinstance(coll, Collection):
            continue
        for c in coll.get_facecolors()[:50]:
            found.add(tuple(round(float(v), 3) for v in c))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_width() * patch.get_height() != 0:
            found.add(tuple(round(c, 3) for c in patch.get_facecolor()))
    return found


def _legend_labels(fig: Figure, ax: Any) -> set[str]:
    """Labels of the axes' legend and of every legend in the figure (one legend may explain a line
    style that every panel shares)."""
    legends = [ax.get_legend(), *fig.legends, *(other.get_legend() for other in fig.axes)]
    return {t.get_text() for leg in legends if leg is not None for t in leg.get_texts()}


def check_figure(fig: Figure, where: str) -> None:
    """The readability rules of the module docstring, on a figure about to be saved."""
    texts = [fig._suptitle.get_text() if fig._suptitle else ""]
    texts += [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("smoke run") for t in texts), f"{where}: no 'smoke run' title in {texts}"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison and not _is_colorbar(ax)]
    colorbars = [ax for ax in fig.axes if _is_colorbar(ax)]
    for ax in panels:
        name = f"{where} panel {ax.get_title()!r}"
        box = ax.get_window_extent(renderer)
        assert min(box.width, box.height) >= MIN_PANEL_PX * fig.dpi / 120, f"{name} is {box.width:.0f}x{box.height:.0f} px"
        if any(isinstance(a, (AxesImage, QuadMesh)) for a in [*ax.images, *ax.collections]):
            assert colorbars and all(cb._colorbar.ax.get_ylabel() or cb._colorbar.ax.get_xlabel() for cb in colorbars), \
                f"{name} maps colours without a labelled colour bar"  # fmt: skip
        if len(_colours(ax)) > 1:
            assert _legend_labels(fig, ax), f"{name} draws {len(_colours(ax))} colours and has no legend"
        for line in ax.lines:
            if line.get_linestyle() in ("--", ":", "-."):
                assert line.get_label() in _legend_labels(fig, ax), \
                    f"{name}: reference line {line.get_label()!r} is not in a legend"  # fmt: skip
    boxes = [(ax, ax.get_tightbbox(renderer)) for ax in panels]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            overlap_w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            overlap_h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            assert overlap_w <= 2 or overlap_h <= 2, \
                f"{where}: the labels of {a.get_title()!r} and {b.get_title()!r} overlap"  # fmt: skip


@pytest.fixture(scope="module")
def quick_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """Run every command once; ``{name: (output directory, figure problems)}``."""
    root = tmp_path_factory.mktemp("quick")
    original = Figure.savefig
    outputs: dict[str, tuple[Path, list[str]]] = {}
    problems: list[str] = []

    def checked_savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            check_figure(self, current)
        except AssertionError as err:
            problems.append(str(err))
        return original(self, fname, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", checked_savefig)
        for current, command in QUICK_RUNS.items():
            out = root / current
            assert main([*command, "--quick", "--quiet", "--out", str(out)]) == 0
            outputs[current] = (out, [p for p in problems if p.startswith(current)])
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK_RUNS))
def test_every_png_of_a_quick_run_reads(quick_outputs, name: str) -> None:
    out, problems = quick_outputs[name]
    assert not problems, "\n".join(problems)
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{name} wrote no PNG"
    for png in pngs:
        pixels = imread(png)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 300, f"{png.name} is only {pixels.shape[1]}x{pixels.shape[0]}"
        assert pixels[..., :3].std() > 0.05, f"{png.name} is blank"
    report = (out / "report.md").read_text()
    assert all(f"({p.name})" in report for p in pngs), "every PNG is shown in report.md"


def test_the_checks_catch_what_they_are_for() -> None:
    """A strip of narrow panels, an image without colour bar, unexplained colours and an unnamed
    reference line are each refused."""
    import matplotlib.pyplot as plt

    def refused(fig: Figure, match: str) -> None:
        with pytest.raises(AssertionError, match=match):
            check_figure(fig, "t")
        plt.close(fig)

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0, 1, 0])
    refused(fig, "no 'smoke run' title")
    fig, axes = plt.subplots(1, 8, figsize=(10, 2.5))
    fig.suptitle("smoke run: strip")
    refused(fig, "px")
    fig, ax = plt.subplots()
    ax.set_title("smoke run: heat")
    ax.imshow([[0, 1], [1, 0]])
    refused(fig, "without a labelled colour bar")
    fig, ax = plt.subplots()
    ax.set_title("smoke run: lines")
    ax.plot([0, 1, 2], [0, 1, 0])
    ax.plot([0, 1, 2], [1, 0, 1])
    refused(fig, "colours and has no legend")
    fig, ax = plt.subplots()
    ax.set_title("smoke run: ref")
    ax.plot([0, 1, 2], [0, 1, 0], label="data")
    ax.axhline(0.5, ls="--")
    ax.legend()
    refused(fig, "reference line")
    fig, ax = plt.subplots()
    ax.set_title("smoke run: fine")
    ax.plot([0, 1, 2], [0, 1, 0], label="data")
    ax.axhline(0.5, ls="--", label="chance")
    ax.legend()
    check_figure(fig, "t")
    plt.close(fig)
