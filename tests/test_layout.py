"""The package's layering: imports run downward only, and no module imports itself through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bakallm"

# The parts of bakallm from the bottom up. A module may import from its own part and from lower
# layers only, never from a part beside or above it; function-level imports count too.
LAYERS = (
    ("errors", "lazy"),
    ("atomic", "locks", "runs"),
    ("kernels", "data"),
    ("model",),
    ("acceleration", "generation", "huggingface"),  # applied to a model, or running one
    ("evaluation",),
    ("results", "harness"),
    ("kinds",),  # what differs between kinds of model, over how each is scored and recorded
    ("training",),
    ("ablation", "plotting"),
    ("commands",),  # the command line's commands, over everything
    ("cli",),  # `bakallm`: imports a command's module by name when it runs
    ("__main__",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """'bakallm.model.network' -> 'model'; 'bakallm' (the package's own __init__) -> 'lazy', the only part it imports."""
    return module.split(".")[1] if "." in module else "lazy"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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


def import_graph() -> dict[str, set[str]]:
    """Every bakallm module and the bakallm modules it imports (a package import counts as its __init__)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for _, target in bakallm_imports(path):
            while (
                target not in modules and "." in target
            ):  # `from bakallm.x import name` names a module or a name in one
                target = target.rsplit(".", 1)[0]
            if target != name:
                imported.add(target)
        graph[name] = imported
    return graph


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(name) for name in import_graph()}
    assert parts - set(RANK) == set()


def test_imports_run_downward_only():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if part_of(target) != part_of(module) and RANK[part_of(target)] >= RANK[part_of(module)]
    ]
    assert upward == []


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    cycles.append(" -> ".join((*path, start)))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, (*path, target)))
    assert cycles == []


def test_the_layout_check_sees_function_level_and_package_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import os\nfrom bakallm import training\n\ndef f():\n    from bakallm.training.trainer import Trainer\n",
        encoding="utf-8",
    )
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
