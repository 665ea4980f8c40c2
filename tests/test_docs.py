"""Every Python example in ``docs/*.md`` runs as written, and so does every ``moekit`` command of the
pages in ``COMMAND_PAGES``.

The blocks of one page run in order in one namespace (later examples build on earlier ones), in a
temporary working directory. A block right after ``<!-- docs-test: skip (reason) -->`` is not run;
the reason says why (for example: it needs torchrun).

The ``moekit`` lines of a command page's bash blocks run in order in one temporary directory, where
tiny stand-ins (``STAND_INS``: random moekit LMs, a tiny Qwen3-MoE with a byte tokenizer, small text
files) carry the names the commands use; ``SHRINK`` appends size options per command (the last value
of an option wins), so each command runs as written, on tiny data.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"(<!-- docs-test: skip[^>]*-->\s*\n)?^([ \t]*)```python\n(.*?)^\2```", re.S | re.M)
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(text: str) -> list[tuple[bool, str]]:
    """``[(skipped, code)]`` for every fenced python block of a markdown page, indentation removed."""
    return [(bool(skip), textwrap.dedent(code)) for skip, _, code in BLOCK.findall(text)]


def test_block_parser_sees_indented_and_skipped_blocks() -> None:
    page = "a\n```python\nx = 1\n```\n<!-- docs-test: skip (why) -->\n```python\nboom\n```\n  ```python\n  y = 2\n  ```\n"
    assert python_blocks(page) == [(False, "x = 1\n"), (True, "boom\n"), (False, "y = 2\n")]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, tmp_path, monkeypatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not any(not skipped for skipped, _ in blocks):
        pytest.skip(f"{page.name} has no runnable python example")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, (skipped, code) in enumerate(blocks):
        if not skipped:
            exec(compile(code, f"{page.name} (python block {i})", "exec"), namespace)


#: pages whose ``moekit`` commands run (with ``SHRINK``)
COMMAND_PAGES = ("evaluation.md", "compression.md")
SHELL = re.compile(r"^([ \t]*)```bash\n(.*?)^\1```", re.S | re.M)
#: name in the docs -> stand-in ("lm": 2-expert moekit LM, "lm8": 8 experts, "qwen": tiny Qwen3-MoE + tokenizer)
STAND_INS = {"merged": "lm", "original": "lm", "other": "lm", "trained": "lm", "untrained": "lm", "merged4": "lm",
             "merged2": "lm", "lm": "lm8", "my-hf-moe": "qwen", "qwen3-moe": "qwen", "notes.txt": "text",
             "corpus.jsonl": "jsonl"}  # fmt: skip
#: options appended to each command (by its first words) so that it runs in seconds
EVAL_SIZES = ["--items", "4", "--prompts", "2", "--prompt-length", "16", "--new-tokens", "3", "--documents", "2",
              "--max-doc-bytes", "96", "--stdlib-bytes", "400000", "--quiet"]  # fmt: skip
SHRINK = {("eval",): EVAL_SIZES, ("compress",): ["--calib-samples", "4", "--seq-len", "16", "--quiet"],
          ("reproduce", "compression"): ["--quick", "--seeds", "0", "--quiet"]}  # fmt: skip


def moekit_commands(text: str) -> list[list[str]]:
    """The arguments of every ``moekit`` line of a page's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for _, body in SHELL.findall(text):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["moekit"]:
                commands.append(words[1:])
    return commands


def test_command_parser_joins_continuations_and_drops_comments() -> None:
    page = "```bash\nmoekit eval a/ \\\n  --out b  # why\npip install x\n```\n"
    assert moekit_commands(page) == [["eval", "a/", "--out", "b"]]


def _stand_in(kind: str, path: Path) -> None:
    import torch

    from moekit import save_checkpoint
    from moekit.models.lm import MoELM

    if kind in ("lm", "lm8"):
        torch.manual_seed(0)
        experts = 8 if kind == "lm8" else 2
        save_checkpoint(MoELM(dim=16, depth=1, heads=2, num_experts=experts, k=1, hidden=16, max_seq_len=64).eval(), path)
    elif kind == "qwen":
        from eval_tiny import byte_tokenizer
        from hf_tiny import tiny_model

        tiny_model("qwen3_moe").save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
    elif kind == "text":
        path.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(40)))
    else:
        path.write_text("".join(f'{{"text": "line {i}\\nvalue = {i} * 2\\nprint(value)\\n"}}\n' for i in range(4)))


def _shrunk(words: list[str]) -> list[str]:
    extra = next((v for k, v in SHRINK.items() if tuple(words[: len(k)]) == k), [])
    return [*words, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("page", COMMAND_PAGES)
def test_commands_run(page: str, tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    import torch

    from moekit.cli.main import main

    commands = moekit_commands((DOCS / page).read_text(encoding="utf-8"))
    assert commands, f"{page} shows no moekit command"
    monkeypatch.chdir(tmp_path)
    for name, kind in STAND_INS.items():
        if any(w.rstrip("/") == name for words in commands for w in words):
            _stand_in(kind, tmp_path / name)
    threads = torch.get_num_threads()
    try:
        for words in commands:
            assert main(_shrunk(words)) == 0, f"{page}: moekit {shlex.join(words)}"
    finally:
        torch.set_num_threads(threads)  # ``moekit eval --threads 2`` sets this process's count
