"""Shared CLI habits (``moekit.cli._options``, ``moekit.progress``): help text with defaults, default
output under moekit-runs/, the recorded command rebuilds its config, progress fits the stream."""

import argparse
import io
import shlex
from dataclasses import replace

import pytest

from moekit.cli._options import add_config_options, command_line, config_from_args, default_out
from moekit.cli.main import build_parser
from moekit.progress import Progress

COMMANDS = [("demo",), ("reproduce", "smear"), ("reproduce", "comet"), ("reproduce", "constraints"), ("report",)]


def _subparser(words: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _walk(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """Every parser of the argparse tree: ``(command words, parser)``."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*words, name))


ALL = list(_walk(build_parser()))
LEAVES = [(w, p) for w, p in ALL if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]


@pytest.mark.parametrize(("words", "parser"), ALL, ids=[" ".join(w) or "moekit" for w, _ in ALL])
def test_every_help_explains_every_option_and_shows_its_default(words, parser) -> None:
    from moekit.cli._help import DefaultsFormatter

    formatter = DefaultsFormatter(" ".join(("moekit", *words)))
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        flag = f"moekit {' '.join(words)} {action.option_strings[0]}"
        assert action.help, f"{flag} has no help text"
        shown = formatter._get_help_string(action) % {"default": action.default}
        if action.nargs != 0 and not action.required:  # flags (store_true) need no default
            assert "default" in shown.lower(), f"{flag} shows no default: {shown!r}"
    parser.format_help()  # renders (no bad % formats)


@pytest.mark.parametrize(("words", "parser"), LEAVES, ids=[" ".join(w) for w, _ in LEAVES])
def test_every_command_has_quiet_and_writes_under_moekit_runs_by_default(words, parser) -> None:
    flags = {s: a for a in parser._actions for s in a.option_strings}
    assert "--quiet" in flags, f"moekit {' '.join(words)} has no --quiet"
    out = flags["--out"]
    assert not out.required
    where = out.default if out.default is not None else out.help
    assert "moekit-runs/" + words[0] in str(where), f"moekit {' '.join(words)} --out defaults to {where!r}"


def test_help_of_the_top_command_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, io, contextlib\nfrom moekit.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n    main(['--help'])\n"
            "assert 'reproduce' in out.getvalue()\n"
            "print(','.join(m for m in ('torch', 'numpy', 'tqdm') if m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip() == ""


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_option_has_help_and_value_options_show_their_default(words) -> None:
    parser = _subparser(words)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help, f"{' '.join(words)} {action.option_strings[0]} has no help text"
        if action.nargs != 0:
            assert "default:" in action.help, f"{' '.join(words)} {action.option_strings[0]} shows no default"
    flags = {s for a in parser._actions for s in a.option_strings}
    if words != ("report",):
        assert {"--out", "--quiet", "--quick", "--threads"} <= flags
        assert parser.get_default("out") == default_out(*words) == "moekit-runs/" + "/".join(words)


@pytest.mark.parametrize("module", ["smear", "comet", "constraints"])
def test_recorded_command_rebuilds_the_config(module: str) -> None:
    import importlib

    cli = importlib.import_module(f"moekit.cli.reproduce.{module}")
    config_cls = {"smear": "SmearConfig", "comet": "CometConfig", "constraints": "ConstraintsConfig"}[module]
    cls = getattr(importlib.import_module(f"moekit.experiments.{module}"), config_cls)
    base = cls()
    first = cli.OPTIONS[0]
    changed = replace(base, threads=2, **{first.name: getattr(cls.quick(), first.name)[:1] or ("x",)})
    command = command_line(cli.WORDS_, changed, cli.OPTIONS, base)
    assert command.startswith(f"moekit reproduce {module} ") and "--threads 2" in command
    args = _subparser(("reproduce", module)).parse_args(shlex.split(command)[3:])
    assert config_from_args(args, cli.OPTIONS, base) == changed
    assert command_line(cli.WORDS_, base, cli.OPTIONS, base) == f"moekit reproduce {module}"


def test_option_values_are_checked_with_the_flag_named() -> None:
    from moekit.cli.reproduce.constraints import OPTIONS
    from moekit.experiments.constraints import ConstraintsConfig

    parser = argparse.ArgumentParser()
    add_config_options(parser, OPTIONS, ConstraintsConfig())
    with pytest.raises(ValueError, match=r"--experts must be comma-separated integers, got '4,x'"):
        config_from_args(parser.parse_args(["--experts", "4,x"]), OPTIONS, ConstraintsConfig())
    with pytest.raises(ValueError, match=r"--epochs must be >= 1, got 0"):
        config_from_args(parser.parse_args(["--epochs", "0"]), OPTIONS, ConstraintsConfig())
    cfg = config_from_args(parser.parse_args(["--num-train", "all", "--positions", "2,3"]), OPTIONS,
                           ConstraintsConfig.quick())  # fmt: skip
    assert cfg.num_train is None and cfg.positions == (2, 3)


def test_progress_in_a_pipe_is_plain_lines_and_off_is_silent(capsys) -> None:
    stream = io.StringIO()
    progress = Progress("auto", stream=stream, interval=1e-9)
    assert progress.mode == "lines"
    with progress.task(3, "work") as task:
        for i in range(3):
            task.advance(note=f"item {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue()
    assert lines[0].startswith("work: 1/3 (33%)") and "left; item 0" in lines[0] and lines[-1].startswith("work: 3/3")
    quiet = Progress.off()
    with quiet.task(2, "silent") as task:
        task.advance()
    quiet.echo("hidden")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="progress mode must be one of"):
        Progress("loud")


def test_progress_lines_are_rate_limited() -> None:
    stream = io.StringIO()
    with Progress("lines", stream=stream, interval=3600).task(100, "many") as task:
        for _ in range(100):
            task.advance()
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]  # only the final line
    assert stream.getvalue().startswith("many: 100/100 (100%)")
