"""``moekit report``: rebuild a run's report, or a document's generated blocks, from results JSON.

    moekit report moekit-runs/reproduce/smear/results.json          # report.md + PNGs, again
    moekit report docs/results/smear.json --doc docs/smear.md       # rewrite the doc's blocks + figures
    moekit report --doc docs/*.md --check                           # exit 1 if any block is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._options import RUNS_ROOT, add_out, add_quiet, checked_out
from ._help import command_summary


SUMMARY = command_summary(__doc__ or "")  # what moekit --help lists


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report", help=SUMMARY,
        description="Write the report (report.md, PNGs) of a results.json written by `moekit demo` or `moekit "
        "reproduce`, or rewrite the generated blocks (<!-- moekit:generated ... -->) of markdown documents "
        "from the results files they name.",
    )  # fmt: skip
    p.add_argument("results", nargs="?", default=None, metavar="RESULTS.json",
                   help="a results file; with --doc, only the blocks that name it are rewritten "
                   "(default: none, every block of each --doc)")  # fmt: skip
    p.add_argument("--doc", action="append", default=[], metavar="DOC.md",
                   help="a markdown document whose generated blocks (and their figures) to rewrite; repeatable "
                   "(default: none)")  # fmt: skip
    add_out(p, what="the rebuilt report", default_help=f"{RUNS_ROOT}/report/<experiment> when no --doc is given")
    p.add_argument("--check", action="store_true",
                   help="write nothing; list the stale blocks of each --doc and exit 1 if there are any")
    add_quiet(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..reporting import atomic_directory, write_json
    from ..reporting_docs import load_results, renderer, stale_blocks, update_document

    if args.results is None and not args.doc:
        raise ValueError("give a RESULTS.json, a --doc DOC.md, or both")
    if args.check and not args.doc:
        raise ValueError("--check compares documents with their results: give --doc")
    for doc in args.doc:
        if not Path(doc).is_file():
            raise FileNotFoundError(f"--doc {doc!r} does not exist")
    say = (lambda m: None) if args.quiet else print
    if args.results is not None and not Path(args.results).is_file():
        raise FileNotFoundError(f"results file {args.results!r} does not exist")
    if args.results is not None and (args.out is not None or not args.doc):
        results = load_results(args.results)
        inputs = [args.results, *args.doc]
        out = checked_out(args, inputs=inputs, out=args.out or f"{RUNS_ROOT}/report/{results['experiment']}")
        module = renderer(results)
        with atomic_directory(out, overwrite=args.overwrite, inputs=inputs, name="--out", writer="moekit report") as stage:
            write_json(stage / "results.json", results)
            try:
                module.write_report(results, stage)
            except KeyError as err:  # a results file edited by hand, or of an older layout
                raise ValueError(f"results file {args.results!r} is not a complete {results['experiment']!r} "
                                 f"results file: it lacks {err}") from None
        print(f"report written to {out / 'report.md'}")
    stale = 0
    for doc in args.doc:
        if args.check:
            blocks = stale_blocks(doc, only_source=args.results)
            stale += len(blocks)
            for block in blocks:
                print(f"stale: {block.label(doc)}", file=sys.stderr)
        else:
            changed = update_document(doc, only_source=args.results)
            say(f"{doc}: {len(changed)} block(s) rewritten, figures written")
    return 1 if stale else 0
