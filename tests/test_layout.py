"""The package's layering: imports run downward only (kernels < model < everything else)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bakallm"

# What each layer may import of bakallm; function-level imports count too.
ALLOWED = {
    "kernels": ("bakallm.kernels", "bakallm.errors"),
    "model": ("bakallm.model", "bakallm.kernels", "bakallm.errors", "bakallm.lazy"),
}


def bakallm_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "bakallm" else [f"bakallm.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "bakallm" or name.startswith("bakallm.")]
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_nothing_above_it(layer):
    modules = sorted((PACKAGE / layer).glob("*.py"))
    assert modules, f"src/bakallm/{layer}/ holds no modules"
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in modules
        for line, name in bakallm_imports(path)
        if not any(name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED[layer])
    ]
    assert upward == []


def test_the_layout_check_sees_function_level_and_package_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom bakallm import training\n\ndef f():\n    from bakallm.training.trainer import Trainer\n", encoding="utf-8")
    assert bakallm_imports(module) == [(2, "bakallm.training"), (5, "bakallm.training.trainer")]


def test_reading_a_model_config_does_not_import_torch():
    code = "import sys, bakallm.model; from bakallm.model.config import ModelConfig; ModelConfig(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_stable_names_come_from_the_model_package():
    import bakallm
    from bakallm.model.config import ModelConfig
    from bakallm.model.network import BakaLM
    from bakallm.model.state import RecurrentState

    assert (bakallm.BakaLM, bakallm.ModelConfig, bakallm.RecurrentState) == (BakaLM, ModelConfig, RecurrentState)
    assert bakallm.model.BakaLM is BakaLM and bakallm.model.load_model.__module__ == "bakallm.model.io"
