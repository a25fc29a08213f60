"""The architecture's rules, checked on the source: imports point down the layers, readers of finished runs
import no torch, modules and functions stay small. ``docs/architecture.md`` draws the same layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "auditor"

# Lower layers never import higher ones. Layers 0-4 import no torch (readers of finished runs live there).
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("version", "errors", "registry", "validation", "stats", "ops"),
    1: (
        "store",
        "shortcuts.flags",
        "shortcuts.thresholds",
        "shortcuts.grids",
        "shortcuts.windows",
        "shortcuts.removals",
        "io.sources",
        "io.images",
        "io.containers",
        "io.tables",
        "io.load",
    ),
    # every analysis module (a new one lands here without editing this table) and the registry they share
    2: ("shortcuts",),
    3: ("shortcuts.catalog",),  # imports every analysis; what runs them and reads their flags
    4: ("outputs",),
    5: ("cams", "metrics"),
    6: ("config", "io", "shortcuts.probes", "shortcuts.interventions", "synthetic"),
    7: ("run",),
    8: ("api", "demo", "cli", "__main__", "__init__"),
}
PACKAGE_INITS = ("io", "run", "shortcuts", "outputs", "store")  # docstring-only __init__ files


def _layer(module: str) -> int:
    """The layer of ``auditor.<module>``: the longest entry that is the module or one of its packages."""
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (layer, name)
    if best is None:
        raise AssertionError(f"auditor.{module} has no layer: add it to LAYERS and docs/architecture.md")
    return best[0]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
            if parts[0] in PACKAGE_INITS and len(parts) == 1:
                continue  # checked below: they import nothing
        out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> list[str]:
    """Every ``auditor.*`` module imported anywhere in the file (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("auditor"):
            base = node.module.removeprefix("auditor").removeprefix(".")
            for alias in node.names:  # ``from auditor.run import local``: the submodule auditor.run.local
                sub = Path(*base.split("."), alias.name) if base else Path(alias.name)
                is_module = (ROOT / sub).is_dir() or (ROOT / sub).with_suffix(".py").is_file()
                found.append(".".join(sub.parts) if is_module else base or "__init__")
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("auditor.") for a in node.names if a.name.startswith("auditor.")]
    return found


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for module, path in _modules():
        own = _layer(module)
        for target in _imports(path):
            if _layer(target) > own:
                upward.append(f"auditor.{module} (layer {own}) imports auditor.{target} (layer {_layer(target)})")
    assert upward == []


def test_package_inits_import_nothing() -> None:
    for name in PACKAGE_INITS:
        tree = ast.parse((ROOT / name / "__init__.py").read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)], name


@pytest.mark.parametrize("module", ["auditor.outputs.gate", "auditor.outputs.report", "auditor.outputs.compare"])
def test_readers_of_finished_runs_import_without_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_no_module_or_function_is_too_long() -> None:
    """~500 lines a module, ~60 lines of code a function (its docstring not counted)."""
    long = []
    for module, path in _modules():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long.append(f"auditor.{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
                n = (node.end_lineno or node.lineno) - body[0].lineno + 1  # code lines, docstring excluded
                if n > 60:
                    long.append(f"auditor.{module}.{node.name}: {n} lines")
    assert long == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan): each holds an import loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops() -> None:
    """Function-level imports count: a lazy import that closes a loop is still a loop (the analyses' registry
    once imported the catalog that imports every analysis that imports the registry)."""
    graph = {module: {t for t in _imports(path) if t != module} for module, path in _modules()}
    assert _cycles(graph) == []
