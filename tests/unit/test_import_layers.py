"""The packages import downward only, without cycles: config <- model <- {storage, optim, data, parallel} <- train.

The check reads the source (AST), so it sees imports inside functions too: a lazy import does not hide an upward
dependency or a cycle.
"""

from __future__ import annotations

import ast
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"config": 0, "model": 1, "storage": 2, "optim": 2, "data": 2, "parallel": 2, "train": 3}


def _modules(root: Path) -> dict[Path, str]:
    return {path: ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for package in LAYER if (root / package).is_dir() for path in (root / package).rglob("*.py")}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, names it may bind)`` of every absolute import in ``path``: ``from a import b``
    binds ``a.b``, which is a module when ``b`` is a submodule."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [node.module] + [f"{node.module}.{a.name}" for a in node.names]))
    return found


def layer_violations(root: Path) -> list[str]:
    """Every upward import (``file:line imports name``) and every import cycle between modules under ``root``."""
    modules = _modules(root)
    known = set(modules.values())
    edges: dict[str, set[str]] = defaultdict(set)
    problems = []
    for path, module in sorted(modules.items()):
        own = LAYER[module.split(".")[0]]
        for line, imported, names in _imports(path):
            top = imported.split(".")[0]
            if LAYER.get(top, -1) > own:
                problems.append(f"upward import: {path.relative_to(root)}:{line} imports {imported}")
            edges[module] |= {name for name in names if name in known and name != module}
    return problems + [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges)]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One closed path through each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(list(edges)):
        if node not in index:
            visit(node)
    return groups


def test_the_project_imports_downward_only_without_cycles():
    assert layer_violations(ROOT) == []


@pytest.fixture
def copy_of_project(tmp_path: Path) -> Path:
    for package in LAYER:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_an_injected_upward_import_fails_naming_the_file_and_line(copy_of_project: Path):
    target = copy_of_project / "model" / "layers.py"
    lines = target.read_text().splitlines()
    lines.insert(3, "from train.trainer import Trainer  # injected")
    target.write_text("\n".join(lines) + "\n")
    problems = layer_violations(copy_of_project)
    assert problems[0] == "upward import: model/layers.py:4 imports train.trainer", problems
    # train.trainer reaches model.layers, so the upward edge also closes a cycle.
    assert all(problem.startswith("import cycle:") for problem in problems[1:])


def test_an_injected_cycle_fails_naming_it(copy_of_project: Path):
    target = copy_of_project / "storage" / "stores.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from storage.build import build_storage\n")
    problems = layer_violations(copy_of_project)
    assert len(problems) == 1 and problems[0].startswith("import cycle:"), problems
    assert "storage.build" in problems[0] and "storage.stores" in problems[0]
