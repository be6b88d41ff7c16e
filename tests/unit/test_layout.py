"""The layout rules of ARCHITECTURE.md §7, read from the source with :mod:`ast` (nothing is imported):
no import cycle among ``app`` modules, no module over 400 lines, static CLI registration, and only the
HTTP layer (``app/api``, the app factory ``app/main.py`` and ``rlpips serve`` in ``app/cli``) speaks HTTP.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.support import ROOT

APP = ROOT / "app"
MAX_LINES = 400
#: Where importing an HTTP framework is allowed, as module-name prefixes.
HTTP_LAYER = ("app.api", "app.main", "app.cli")
HTTP_PACKAGES = {"fastapi", "starlette", "uvicorn"}


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    """``module`` is one of ``prefixes`` or inside one of them (dotted names)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module under ``app/`` by dotted name (a package by its ``__init__.py``)."""
    found = {module_name(p): p for p in sorted(APP.rglob("*.py"))}
    assert "app.main" in found and "app.metric" in found, sorted(found)
    return found


@cache
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def imports(name: str) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import statement in module ``name``, anywhere in it
    (function bodies and ``if TYPE_CHECKING`` blocks too); relative imports resolved to absolute.
    ``from pkg import x`` yields ``pkg.x`` when that is a module of ``app``, else ``pkg``."""
    is_package = modules()[name].name == "__init__.py"
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in modules() else base), node.lineno


def app_edges(name: str) -> set[str]:
    """The ``app`` modules that importing ``name`` executes directly: each imported module and the
    package ``__init__`` files above it, except the packages that contain ``name`` itself (they are
    already running when ``name`` is imported)."""
    own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    if modules()[name].name == "__init__.py":
        own.add(name)
    out: set[str] = set()
    for target, _ in imports(name):
        if not target.startswith("app.") and target != "app":
            continue
        assert target in modules(), f"{name} imports {target}, which is not a module of app/"
        parts = target.split(".")
        for k in range(1, len(parts) + 1):
            out.add(".".join(parts[:k]))
    return out - own - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_import_graph_sees_packages_and_submodules() -> None:
    assert "app.metric.store" in app_edges("app.config")
    assert "app.metric" in app_edges("app.config")  # the package __init__ runs first
    assert {"app.api.distance", "app.api.probes"} <= app_edges("app.main")  # from app.api import x
    assert "app.metric" not in app_edges("app.metric.lpips")  # its own package: already running
    assert "app.metric.lpips" in app_edges("app.metric")


def test_no_import_cycle_among_app_modules() -> None:
    graph = {name: app_edges(name) for name in modules()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_is_over_400_lines() -> None:
    sizes = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_cli_registers_subcommands_statically() -> None:
    """No ``importlib`` (or ``__import__``) in ``app/cli``: every subcommand is a plain import."""
    found = []
    for name in modules():
        if not name.startswith("app.cli"):
            continue
        for target, line in imports(name):
            if target.split(".")[0] == "importlib":
                found.append(f"{name}:{line} imports {target}")
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.Name) and node.id == "__import__":
                found.append(f"{name}:{node.lineno} uses __import__")
    assert not found, found


def test_only_the_cli_parses_arguments() -> None:
    """Argument parsing belongs to ``app/cli``; ``app/training`` and the rest take typed values."""
    found = [
        f"{name}:{line}"
        for name in modules()
        if not within(name, ("app.cli",))
        for target, line in imports(name)
        if target.split(".")[0] == "argparse"
    ]
    assert not found, f"argparse imported outside app/cli: {found}"


@pytest.mark.parametrize("name", sorted(HTTP_PACKAGES))
def test_only_the_http_layer_imports(name: str) -> None:
    found = [
        f"{mod}:{line} imports {target}"
        for mod in modules()
        if not within(mod, HTTP_LAYER)
        for target, line in imports(mod)
        if target.split(".")[0] == name
    ]
    assert not found, f"{name} outside {', '.join(HTTP_LAYER)}: {found}"


def test_the_library_never_imports_the_http_or_cli_layer() -> None:
    """Data flows one way: ``serving``, ``metric``, ``attacks``, ``training`` and the top-level helpers
    do not import ``app.api``, ``app.main`` or ``app.cli`` (which would bring HTTP in indirectly)."""
    found = [
        f"{mod}:{line} imports {target}"
        for mod in modules()
        if not within(mod, HTTP_LAYER)
        for target, line in imports(mod)
        if within(target, HTTP_LAYER)
    ]
    assert not found, found
