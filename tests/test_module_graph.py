"""The Python layer's structure (docs/api.md §11 and CONTRIBUTING.md): imports only go down (no two modules of
adamcpp import each other, directly or through others, at module level or inside a function), and no module reads
another object's private members (ruff's SLF001, run here where ruff is installed).

Both read the installed package's sources, so they hold for a wheel as much as for the source tree."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

import adamcpp

PACKAGE = Path(adamcpp.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["adamcpp", *parts])


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, level: int, name: str) -> str:
    """The absolute name of a relative import `from <level dots><name>` made in `module`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the adamcpp modules it imports (anywhere in its body, functions included)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node.level, node.module or "") if node.level else (node.module or "")
                names = [f"{base}.{alias.name}" for alias in node.names]
                submodules = [n for n in names if n in modules or n in sys.modules]  # sources, or the extension
                # `from . import x` imports the submodule x; names that are not submodules come from base itself
                targets = submodules if len(submodules) == len(names) else [base, *submodules]
            for target in targets:
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """A cycle of imports (the modules in order, the first repeated at the end), or [] if there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_graph_is_read_from_the_package():
    graph = import_graph()
    # A few edges that must be seen for the test to mean anything.
    assert "adamcpp.optim" in graph["adamcpp"]
    assert "adamcpp._layout_list" in graph["adamcpp.optim"]
    assert "adamcpp._native" in graph["adamcpp._layout_list"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_imports_only_go_down():
    cycle = find_cycle(import_graph())
    assert not cycle, "adamcpp modules import each other: " + " -> ".join(cycle)


def test_only_the_native_caller_calls_the_step_entries():
    """_native.py is the one caller of _core's step entries: no other module names them."""
    entries = ("adam_step", "sgd_step", "cuda_adam_step", "cuda_sgd_step")
    callers = {}
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in entries:
                callers.setdefault(module, set()).add(node.attr)
    assert set(callers) == {"adamcpp._native"}, callers


@pytest.mark.skipif(shutil.which("ruff") is None and not Path(sys.executable).with_name("ruff").exists(),
                    reason="needs ruff (the lint extra)")
def test_no_module_reads_another_objects_private_members():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    done = subprocess.run([ruff, "check", "--no-cache", "--isolated", "--select", "SLF001", str(PACKAGE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
