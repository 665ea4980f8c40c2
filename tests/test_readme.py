"""The README's Python code blocks run as written, and its test command is the one CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_blocks_run(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python code block"
    monkeypatch.chdir(tmp_path)  # examples may write files
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    commands = [line for line in re.findall(r"```bash\n(.*?)```", README, re.S) if "pytest" in line]
    assert commands, "README has no test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0].strip().replace("pip install ", "pip install -q ") in ci


def test_readme_lists_every_registered_router_bank_and_loss() -> None:
    import moekit

    for name in [*moekit.list_routers(), *moekit.list_experts(), *moekit.list_losses()]:
        assert f"`{name}`" in README, f"README does not mention {name!r}"
