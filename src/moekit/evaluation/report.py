"""Evaluation outputs: ``results.json`` (everything but the item texts), ``items.jsonl`` (the items and
prompts, one per line) and ``report.md`` (tables with 95% intervals), written as one directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..confidence import Interval
from ..reporting import atomic_directory, atomic_write_text, markdown_table, read_json, write_json
from .metrics import METRICS

__all__ = ["markdown_report", "write_report", "load_results", "format_interval"]

SUMMARY = (("perplexity", "bits_per_byte"), ("perplexity", "nll_per_token"), ("choice", "acc"),
           ("choice", "acc_norm"), ("cloze", "acc"), ("cloze", "acc_norm"))  # fmt: skip
GENERATE = ("kl", "top1_agreement", "continuation_agreement", "exact_prefix", "repetition",
            "reference_repetition", "text_repetition")  # fmt: skip


def _interval(d: Mapping[str, Any]) -> Interval:
    nan = lambda v: math.nan if v is None else float(v)  # noqa: E731  (JSON null = NaN)
    return Interval(float(d["estimate"]), nan(d["low"]), nan(d["high"]), int(d["n"]), float(d["level"]), d["method"])


def format_interval(task: str, metric: str, d: Mapping[str, Any] | None) -> str:
    """``"2.31 [2.25, 2.37]"`` (percent for accuracies and rates), ``"-"`` when absent."""
    if d is None:
        return "-"
    percent = METRICS[task][metric].percent
    return _interval(d).format(".3g", scale=100.0 if percent else 1.0) + (" %" if percent else "")


def _metric(run: Mapping[str, Any], task: str, metric: str) -> Mapping[str, Any] | None:
    return (run["tasks"].get(task) or {}).get("metrics", {}).get(metric)


def markdown_report(result: Mapping[str, Any]) -> str:
    """The readable report of an ``evaluate`` result."""
    data, settings, runs = result["data"], result["settings"], result["runs"]
    docs = data["documents"]
    lines = ["# moekit eval", ""]
    source = "held-out stdlib files" if data.get("name") == "stdlib" else ", ".join(data.get("files", []))
    lines += [f"- data: {source} ({len(docs)} documents, sha256 `{data['sha256'][:12]}`)"]
    for run in runs:
        m = run["model"]
        tok = "bytes" if m["byte_level"] else (m.get("tokenizer") or "token ids")
        lines += [f"- {run['role']}: `{run['name']}` ({m['kind']}, {m['parameters']:,} parameters, "
                  f"tokens: {tok}, context {m['context']})"]  # fmt: skip
    lines += [f"- seed {settings['seed']}, {settings['level']:.0%} intervals: BCa bootstrap over documents "
              "(perplexity), items (choice, cloze) and prompts (generate)", ""]  # fmt: skip
    present = [(t, m) for t, m in SUMMARY if any(_metric(r, t, m) for r in runs)]
    if present:
        headers = ["run"] + [f"{t} {METRICS[t][m].label}" for t, m in present]
        rows = [[r["name"]] + [format_interval(t, m, _metric(r, t, m)) for t, m in present] for r in runs]
        lines += [markdown_table(headers, rows)]
        chance = {t: r["tasks"][t]["chance"] for r in runs for t in ("choice", "cloze") if t in r["tasks"]}
        if chance:
            lines += ["Chance accuracy: " + ", ".join(f"{t} {100 * c:.3g} %" for t, c in chance.items()) + ".", ""]
    gen = runs[0]["tasks"].get("generate")
    if gen:
        st = gen["settings"]
        lines += [f"## Generation ({st['prompts']} prompts, {st['new_tokens']} greedy tokens, "
                  f"reference: `{gen['reference']}`)", ""]  # fmt: skip
        shown = [m for m in GENERATE if m in gen["metrics"]]
        lines += [markdown_table([METRICS["generate"][m].label for m in shown],
                                 [[format_interval("generate", m, gen["metrics"][m]) for m in shown]])]  # fmt: skip
        lines += [f"Repeated n-grams: n = {st['ngram']} tokens.", ""]
        for ex in gen.get("examples", []):
            lines += ["```text", f"prompt:    ...{ex['prompt']!r}", f"model:     {ex['model']!r}"]
            if ex.get("reference") is not None:
                lines += [f"reference: {ex['reference']!r}"]
            lines += [f"text:      {ex['text']!r}", "```", ""]
    if result.get("comparisons"):
        lines += ["## Paired differences", ""]
        rows = []
        for c in result["comparisons"]:
            d = c["difference"]
            rows.append([f"{c['task']} {METRICS[c['task']][c['metric']].label}", c["a"], c["b"],
                         format_interval(c["task"], c["metric"], d), c["better"], c["verdict"]])  # fmt: skip
        lines += [markdown_table(["metric", "A", "B", "A - B [95% CI]", "better", "verdict"], rows)]
    for skip in result.get("not_compared") or []:
        lines += [f"Not compared: {skip['task']} of `{skip['a']}` and `{skip['b']}` ({skip['reason']}).", ""]
    if result.get("lm_eval"):
        lines += ["## lm-eval", "", "```json", json.dumps(result["lm_eval"]["results"], indent=2), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(result: Mapping[str, Any], out: str | os.PathLike[str], *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike[str]] = (), name: str = "out") -> Path:  # fmt: skip
    """Write ``results.json``, ``items.jsonl`` and ``report.md`` into ``out`` (atomically): absent or
    empty unless ``overwrite``, which replaces only an earlier output of moekit; never overlapping
    ``inputs``. ``name`` is the argument named in errors."""
    body = {k: v for k, v in result.items() if k != "items"}
    items = [json.dumps({"task": task, **item}) for task, rows in result.get("items", {}).items() for item in rows]
    with atomic_directory(out, overwrite=overwrite, inputs=inputs, name=name, writer="moekit eval") as stage:
        write_json(stage / "results.json", body)
        atomic_write_text(stage / "items.jsonl", "".join(line + "\n" for line in items))
        atomic_write_text(stage / "report.md", markdown_report(result))
    return Path(out)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An earlier ``results.json`` (or the directory holding it), checked to be a moekit eval result."""
    from .harness import FORMAT

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"evaluation results {str(path)!r} do not exist")
    result = read_json(path, what="evaluation results")
    if not isinstance(result, dict) or result.get("format") != FORMAT or not result.get("runs"):
        what = (f"the results of moekit reproduce {result['experiment']}" if isinstance(result, dict) and
                isinstance(result.get("experiment"), str) else f"no format {FORMAT!r} with runs")  # fmt: skip
        raise ValueError(f"{str(path)!r} is not a results.json of moekit eval ({what})")
    return result
