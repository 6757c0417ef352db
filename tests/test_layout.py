"""simclr_core's layout, read from its source with ast: its layers import only downwards,
the paper's parts (``simclr_core.method``) import nothing else of the library, nothing
imports kfp or kubernetes, and no function is longer than a screen."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import simclr_core

PACKAGE = Path(simclr_core.__file__).resolve().parent
METHOD = "simclr_core.method"
MAX_FUNCTION_LINES = 60

# The data package, bottom up: each module may import those before it, never one after it.
DATA_MODULES = (
    "simclr_core.data.raw", "simclr_core.data.rows", "simclr_core.data.images", "simclr_core.data.pool", "simclr_core.data.folder",
    "simclr_core.data.idx", "simclr_core.data.archive", "simclr_core.data.sources", "simclr_core.data.prepared",
    "simclr_core.data.writer",
)
# What the reader may use of the data package: nothing of the writer's side (PIL, sources, archives),
# only the row reading it shares with the writer's scratch files.
READER = "simclr_core.data.prepared"
READER_MAY_USE = ("simclr_core.data.rows",)

# Floors, bottom first: a module may import its own floor and the ones below, never one above.
# A new module must be given a floor here.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("simclr_core", "simclr_core.config", "simclr_core.errors", "simclr_core.storage", METHOD, "simclr_core.features", "simclr_core.knn"),
    ("simclr_core.manifest", "simclr_core.data", *DATA_MODULES, "simclr_core.checkpoint", "simclr_core.runlock",
     "simclr_core.monitoring", "simclr_core.launch", "simclr_core.staging"),
    ("simclr_core.pretrain", "simclr_core.evaluate", "simclr_core.report", "simclr_core.summary"),
    ("simclr_core.cli", "simclr_core.__main__"),
)
FORBIDDEN_ROOTS = ("kfp", "kubernetes")  # simclr_core runs anywhere; components/ holds the Kubeflow side


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {
    _module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in path.parts
}


def _imports(name: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in module ``name``, inside functions too.

    ``from a import b`` names ``a.b`` where that is a module of simclr_core, else ``a``;
    relative imports are resolved against ``name``'s package.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def _floor(module: str) -> int | None:
    """The floor of a simclr_core module: its own entry, or its longest listed package."""
    best: tuple[int, int] | None = None  # (matched length, floor)
    for floor, entries in enumerate(FLOORS):
        for entry in entries:
            if module == entry or (entry != "simclr_core" and module.startswith(entry + ".")):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), floor)
    return None if best is None else best[1]


def _library_imports() -> Iterator[tuple[str, int, str]]:
    """(importer, line, imported) for every import of a simclr_core module by another."""
    for name in MODULES:
        for line, imported in _imports(name):
            if imported == "simclr_core" or imported.startswith("simclr_core."):
                yield name, line, imported


def test_every_module_has_a_floor():
    assert [name for name in MODULES if _floor(name) is None] == [], "add the module to FLOORS in tests/test_layout.py"


def test_imports_only_point_down():
    upward = [
        f"{name}:{line} imports {imported} (floor {_floor(imported)} above {_floor(name)})"
        for name, line, imported in _library_imports()
        if _floor(imported) is not None and _floor(imported) > _floor(name)
    ]
    assert upward == []


def test_method_imports_nothing_of_the_library_outside_method():
    outside = [
        f"{name}:{line} imports {imported}"
        for name, line, imported in _library_imports()
        if (name == METHOD or name.startswith(METHOD + ".")) and not (imported == METHOD or imported.startswith(METHOD + "."))
    ]
    assert outside == []


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, _, imported in _library_imports():
        target = imported if imported in MODULES else imported.rpartition(".")[0]
        if target in MODULES and target != name:
            graph[name].add(target)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_simclr_core_imports_neither_kfp_nor_kubernetes():
    found = [
        f"{name}:{line} imports {imported}"
        for name in MODULES
        for line, imported in _imports(name)
        if imported.split(".")[0] in FORBIDDEN_ROOTS
    ]
    assert found == []


def test_no_function_is_longer_than_a_screen():
    """Every function and method, nested ones included: from its ``def`` line to its last line."""
    long = [
        f"{name}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], f"split these into named steps of at most {MAX_FUNCTION_LINES} lines"


def test_data_modules_import_only_those_below_them():
    order = {name: index for index, name in enumerate(DATA_MODULES)}
    upward = [
        f"{name}:{line} imports {imported}"
        for name, line, imported in _library_imports()
        if name in order and imported in order and order[imported] >= order[name]
    ]
    assert upward == []
    assert set(DATA_MODULES) == {name for name in MODULES if name.startswith("simclr_core.data.")}, "list the new module in DATA_MODULES"


def test_the_reader_imports_nothing_of_the_writer_side():
    found = [imported for _, imported in _imports(READER)
             if (imported.startswith("simclr_core.data") and imported not in READER_MAY_USE) or imported.split(".")[0] == "PIL"]
    assert found == []


def test_the_source_registry_and_the_config_agree():
    """``prepare.source`` is validated in config (below the data package) against the registry's names."""
    from simclr_core.config import SOURCES as NAMES
    from simclr_core.data.sources import SOURCES

    assert list(SOURCES) == list(NAMES)
