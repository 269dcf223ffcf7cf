"""The package's import structure: no import circle, and no import from a lower layer up.

Every module under ``src/nirdml`` is parsed with ``ast`` (nothing is imported or run); its
imports of nirdml modules -- at module level and inside functions, not those under
``if TYPE_CHECKING:`` -- make a graph. Module-level imports must have no cycle, and no import at
any level may reach a module of a higher layer than the importer's (``LAYERS``, bottom-up; a
layer may import its own modules and every layer below it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import nirdml

PACKAGE = Path(nirdml.__file__).resolve().parent

#: bottom-up; a module belongs to the layer of the longest name prefix listed (``a.b`` covers
#: ``a.b`` and ``a.b.*``). Every module must be covered.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # shared leaves: import nothing above themselves
    ("leaves", ("nirdml", "nirdml.errors", "nirdml.registry", "nirdml.files", "nirdml.owned",
                "nirdml.devices", "nirdml.embeddings", "nirdml.console", "nirdml.lazy",
                "nirdml.commands.argtypes")),
    # a model's embeddings of a dataset: torch and the leaves only, so the feature cache (data)
    # and the trainer's validation can use it, although it lives with inference
    ("embed", ("nirdml.inference.embed",)),
    ("data", ("nirdml.data",)),
    ("models", ("nirdml.models",)),
    ("losses", ("nirdml.losses",)),
    ("nir", ("nirdml.nir",)),
    # metrics of embeddings: only the leaves; below training, whose validation evaluates
    ("evaluation", ("nirdml.evaluation",)),
    ("training", ("nirdml.training",)),
    ("analysis/inference", ("nirdml.analysis", "nirdml.inference")),
    ("retrieval/export/reports/selection", ("nirdml.retrieval", "nirdml.export",
                                            "nirdml.reports", "nirdml.selection")),
    # the search service: a retriever behind HTTP
    ("serve", ("nirdml.serve",)),
    ("commands", ("nirdml.commands", "nirdml.cli", "nirdml.__main__")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["nirdml", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """The nirdml module ``name`` (or its longest prefix that is one)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for each nirdml import of ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nirdml" or alias.name.startswith("nirdml."):
                    found.append((_resolve(alias.name), in_function, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "nirdml" or source.startswith("nirdml."):
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    found.append((_resolve(target if target in MODULES else source),
                                  in_function, node.lineno))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
        visit(node, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return [(target, f, line) for target, f, line in found if target != module]


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return level


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_circle_at_module_level():
    edges = {m: sorted({t for t, in_function, _ in GRAPH[m] if not in_function})
             for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            walk(module)


def test_no_import_from_a_lower_layer_up():
    upward = []
    for module, imports in GRAPH.items():
        for target, in_function, line in imports:
            if layer_of(target) > layer_of(module):
                where = "in a function" if in_function else "at module level"
                upward.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} "
                              f"({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]}) {where}")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_the_layer_check_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from . import core\n"
                      "if TYPE_CHECKING:\n    from nirdml.cli import main\n"
                      "def f():\n    from nirdml.inference import TrainedRun\n")
    found = _imports("nirdml.evaluation.m", source)
    assert ("nirdml.evaluation.core", False, 2) in found
    assert ("nirdml.inference", True, 6) in found
    assert not any(t == "nirdml.cli" for t, _, _ in found)


def test_metric_defaults_and_the_evaluate_command_import_without_numpy_or_torch():
    src = str(PACKAGE.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, nirdml.evaluation.names, nirdml.evaluation, nirdml.commands.evaluate; "
            f"assert nirdml.__file__.startswith({src!r}), nirdml.__file__; "
            "assert nirdml.evaluation.DEFAULT_METRICS == nirdml.commands.evaluate.DEFAULT_METRICS; "
            "heavy = [m for m in ('numpy', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
