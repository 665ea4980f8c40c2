"""`import moekit` and building the CLI parser stay light: heavy optional libraries load only on use."""

import subprocess
import sys

import pytest

HEAVY = ("scipy", "matplotlib", "sklearn", "transformers")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return [m for m in out.strip().split(",") if m]


@pytest.mark.parametrize(
    "code",
    [
        "import moekit",
        "from moekit.cli.main import build_parser; build_parser()",
        "import moekit; moekit.MoE, moekit.TopKRouter, moekit.list_routers(), moekit.merge_moekit_model",
    ],
    ids=["import", "cli-parser", "core-names"],
)
def test_heavy_libraries_are_not_imported(code):
    assert _loaded_after(code) == []


def test_every_public_name_resolves():
    import moekit

    for name in moekit.__all__:
        assert getattr(moekit, name) is not None, name
    assert set(moekit.__all__) <= set(dir(moekit))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        moekit.not_a_name


def test_star_import_and_registries_without_explicit_imports():
    code = (
        "from moekit import *\n"
        "from moekit.registry import MODELS, ROUTERS, LOSSES, EXPERTS, MERGE_METHODS\n"
        "assert {'moe_lm', 'resnet_moe', 'moe_classifier', 'mmoe'} <= set(MODELS.names())\n"
        "assert 'topk' in ROUTERS and 'switch' in LOSSES and 'glu' in EXPERTS and 'mcsmoe' in MERGE_METHODS\n"
        "assert 'transformers' not in __import__('sys').modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
