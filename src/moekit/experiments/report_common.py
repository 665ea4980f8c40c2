"""Pieces every experiment report shares: the smoke-run label, intervals as table cells, and claims
checked by their confidence interval (``moekit.confidence.verdict``), never by the means.

    claims = [Claim("SMEAR beats tag routing", paired_difference(smear, tag), "positive", scale=100)]
    claims_table(claims, smoke=results["smoke_run"])   # markdown; no verdicts in a smoke run
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..confidence import Interval, mean_interval, verdict
from ..reporting import atomic_write_text, markdown_table

__all__ = [
    "SMOKE_BANNER",
    "runs_by",
    "is_smoke",
    "smoke_banner",
    "plot_title",
    "cell",
    "mean_cell",
    "Claim",
    "claims_table",
    "verdict_list",
    "command_block",
    "runtime_line",
    "figure_links",
    "pyplot",
    "report_sections",
    "HEADINGS",
    "write_markdown_report",
]

SMOKE_BANNER = (
    "> **Smoke run** (`--quick`): tiny data and training, to show that the pipeline works. The numbers "
    "below mean nothing about the paper, and no claim gets a verdict."
)


def is_smoke(results: Mapping[str, Any]) -> bool:
    return bool(results.get("smoke_run", False))


def smoke_banner(results: Mapping[str, Any]) -> str:
    """The smoke-run label (with a blank line after it) for a smoke run, else nothing."""
    return SMOKE_BANNER + "\n\n" if is_smoke(results) else ""


def plot_title(results: Mapping[str, Any], title: str) -> str:
    """A figure title, prefixed with "smoke run: " for smoke runs."""
    return f"smoke run: {title}" if is_smoke(results) else title


def _number(value: float, spec: str) -> str:
    text = format(value, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def cell(interval: Interval, *, scale: float = 1.0, spec: str = ".1f") -> str:
    """``"85.7 [84.9, 86.5]"``, or ``"85.7 (n=1)"`` when no interval is defined."""
    est = _number(interval.estimate * scale, spec)
    if not interval.defined:
        return f"{est} (n={interval.n})"
    return f"{est} [{_number(interval.low * scale, spec)}, {_number(interval.high * scale, spec)}]"


def mean_cell(values: Sequence[float], *, scale: float = 1.0, spec: str = ".1f") -> str:
    """Mean and 95% t-interval of ``values`` (NaNs dropped) as a table cell; ``"—"`` when empty."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return cell(mean_interval(vals), scale=scale, spec=spec) if vals else "—"


@dataclass(frozen=True)
class Claim:
    """A claim about the sign of a measured difference (``claimed``: "positive" or "negative")."""

    statement: str
    difference: Interval
    claimed: str = "positive"
    scale: float = 1.0
    spec: str = ".2f"
    unit: str = ""

    @property
    def verdict(self) -> str:
        return verdict(self.difference, claimed=self.claimed)

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.statement, "claimed": self.claimed, "difference": self.difference.to_dict(),
                "verdict": self.verdict}  # fmt: skip


def claims_table(claims: Sequence[Claim], *, smoke: bool, measured: str = "measured difference [95% CI]") -> str:
    """One row per claim: the difference with its interval, n and the verdict (left out in a smoke run)."""
    headers = ["claim", measured, "n"] + ([] if smoke else ["verdict"])
    rows = []
    for c in claims:
        diff = cell(c.difference, scale=c.scale, spec=c.spec) + (f" {c.unit}" if c.unit else "")
        rows.append([c.statement, diff, c.difference.n] + ([] if smoke else [f"**{c.verdict}**"]))
    note = (
        "\nSmoke run: no verdicts.\n"
        if smoke
        else "\nVerdict from the 95% interval: *supported* when it lies entirely on the claimed side of 0, "
        "*contradicted* when entirely on the other side, otherwise *inconclusive at this scale*.\n"
    )
    return markdown_table(headers, rows) + note


def verdict_list(claims: Sequence[Claim], *, smoke: bool) -> str:
    """One bullet per claim: ``claim: **verdict** (difference [95% CI])``; a smoke run gives none."""
    if smoke:
        return "Smoke run: no verdicts.\n"
    return "".join(f"- {c.statement}: **{c.verdict}** ({cell(c.difference, scale=c.scale, spec=c.spec)}"
                   f"{' ' + c.unit if c.unit else ''}, n = {c.difference.n})\n" for c in claims)  # fmt: skip


def _machine(env: Mapping[str, Any]) -> str:
    cpus = f"{env['cpus']} CPU cores, " if env.get("cpus") else ""
    return f"{env['torch_threads']} torch thread(s) on {cpus}{env['platform']}"


def command_block(results: Mapping[str, Any], **_: str) -> str:
    """The command that wrote the results, its environment and its wall-clock time."""
    env = results["environment"]
    versions = env.get("versions", {})
    command = results.get("command") or "(run from Python; the config above determines it)"
    total = results.get("timing", {}).get("total_s")
    took = f", {total / 60:.1f} min wall-clock" if total is not None else ""
    return (
        f"```bash\n{command}\n```\n\n"
        f"torch {versions.get('torch', env.get('torch'))}, numpy {versions.get('numpy')}, "
        f"scikit-learn {versions.get('scikit-learn')}, moekit {versions.get('moekit')}; "
        f"{_machine(env)}{took}.\n"
    )


def runtime_line(results: Mapping[str, Any], **_: str) -> str:
    """One line for a summary (the README): the command, its wall-clock time and the machine."""
    env = results["environment"]
    total = results.get("timing", {}).get("total_s")
    took = f"{total / 60:.1f} min wall-clock" if total is not None else "time not recorded"
    command = results.get("command") or results["experiment"]
    return f"- `{command}`: {took}, {_machine(env)}.\n"


def figure_links(figures: Sequence[tuple[str, str]], images: str = ".") -> str:
    """Markdown image links for ``(file name, title)`` pairs, relative to ``images``."""
    prefix = "" if images in (".", "") else images.rstrip("/") + "/"
    return "\n".join(f"![{title}]({prefix}{name})\n" for name, title in figures)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_sections(*, figures: Callable[[Mapping[str, Any]], Sequence[tuple[str, str]]],
                    claims: Callable[[Mapping[str, Any]], Sequence[Claim]] | None = None,
                    **sections: Callable[..., str]) -> dict[str, Callable[..., str]]:  # fmt: skip
    """An experiment's ``SECTIONS``: its own ``sections`` (``setup``, ``results``, ...), the shared ``command``
    and ``runtime``, ``verdicts`` (a bullet per claim of ``claims(results)``, when given) and ``figures`` (links
    to the ``(file name, title)`` pairs of ``figures(results)``, below the ``images=`` folder)."""
    out = {"command": command_block, "runtime": runtime_line, **sections}
    if claims is not None:
        out.setdefault("verdicts", lambda results, **_: verdict_list(claims(results), smoke=is_smoke(results)))
    out["figures"] = lambda results, *, images=".", **_: figure_links(figures(results), images)
    return out


#: ``report.md``'s heading of a section, by its ``SECTIONS`` key (a report may rename one)
HEADINGS = {"setup": "Setup", "command": "Command", "results": "Results", "comparisons": "Against the paper's claims",
            "utilisation": "Expert utilisation", "timing": "Time"}  # fmt: skip


def write_markdown_report(results: Mapping[str, Any], out: str | Path, sections: Mapping[str, Callable[..., str]],
                          write_figures: Callable[[Mapping[str, Any], Path], None], *, title: str,
                          figures: Sequence[tuple[str, str]],
                          order: Sequence[str] = ("setup", "command", "results", "comparisons", "timing"),
                          headings: Mapping[str, str] | None = None, footer: str = "") -> Path:  # fmt: skip
    """A run's ``report.md`` and its figures (``write_figures(results, out)``) in ``out``: the title, the
    smoke-run label, the paper, one ``## heading`` per key of ``order`` (``sections[key]``, headed by
    ``headings`` or ``HEADINGS``), one per figure ``(file name, title)``, and ``footer``."""
    out = Path(out)
    write_figures(results, out)
    names = {**HEADINGS, **(headings or {})}
    parts = [f"# {title}\n", smoke_banner(results)]
    if results.get("paper"):
        parts.append(f"Paper: {results['paper']}.\n")
    for key in order:
        parts += [f"## {names[key]}\n", sections[key](results)]
    parts += [f"## {name}\n\n![{name}]({file})\n" for file, name in figures]
    parts.append(footer)
    return atomic_write_text(out / "report.md", "\n".join(p for p in parts if p))


def runs_by(results: Mapping[str, Any], key: str) -> dict[str, list[Mapping[str, Any]]]:
    """The runs of ``results["runs"]`` grouped by ``run[key]`` (in first-seen order), each group in the
    order of ``results["config"]["seeds"]``."""
    order = {s: i for i, s in enumerate(results["config"]["seeds"])}
    out: dict[str, list[Mapping[str, Any]]] = {}
    for run in results["runs"]:
        out.setdefault(run[key], []).append(run)
    return {k: sorted(v, key=lambda r: order[r["seed"]]) for k, v in out.items()}
