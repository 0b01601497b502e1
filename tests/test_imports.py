"""The package's import graph: every module imports, and no chain of imports (top-level or inside a function)
comes back to where it started."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import cct

PACKAGE_DIR = Path(cct.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (a `from X import name` counts as X.name
    where that is a module, else X)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != module}


def import_graph() -> dict[str, set[str]]:
    modules = _package_modules()
    return {name: _imported(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the list of its nodes (first repeated last), or None."""
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return trail[trail.index(node):] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, [*trail, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node, []))), None)


def test_every_module_imports():
    for name in _package_modules():
        if name != "cct.__main__":
            importlib.import_module(name)


def test_no_import_cycle():
    graph = import_graph()
    assert graph["cct.train.loop"] >= {"cct.train.distributed", "cct.models", "cct.data.loader"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_models_know_nothing_of_data_or_training():
    for name, targets in import_graph().items():
        if name.startswith("cct.models"):
            assert not {t for t in targets if t.startswith(("cct.data", "cct.train", "cct.cli"))}, name


def test_package_faces_export_their_entry_points():
    import cct.data
    import cct.train

    for package in (cct, cct.data, cct.train):
        assert package.__all__, package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    assert callable(cct.data.build_dataset) and callable(cct.data.ensure_dataset)
    assert {"BatchAugment", "dataset_info", "normalize", "BatchSource"} <= set(cct.data.__all__)
    assert {"train", "evaluate", "Config", "load_config", "load_trained", "evaluate_checkpoint"} \
        <= set(cct.train.__all__)
    assert callable(cct.train.evaluate) and callable(cct.train.train)
